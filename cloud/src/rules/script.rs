//! Per-product data-parsing scripts in JavaScript (QuickJS), on Alibaba's script contract:
//! `rawDataToProtocol(bytes)` turns a device's raw uplink into Alink JSON,
//! `protocolToRawData(json)` turns Alink JSON for the device into bytes, and
//! `transformPayload(topic, bytes)` turns a custom topic's payload into JSON. `bytes` is an
//! array of numbers 0..255, as Alibaba's scripts expect (they mask with `& 0xff` anyway).
//!
//! Each product's script is compiled once, in its own QuickJS runtime on its own thread, with
//! a memory limit; every call has a time limit. A call over either limit fails with a clear
//! error and the runtime is rebuilt, so one bad message cannot poison the next.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as smpsc, Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Script limits (config `[rules]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time per call.
    pub time: Duration,
    /// Memory of a product's runtime.
    pub memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: Duration::from_millis(50),
            memory: 16 * 1024 * 1024,
        }
    }
}

/// Why a script call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ScriptError {
    /// The product has no script.
    #[error("product `{0}` has no data-parsing script")]
    NoScript(String),
    /// The script does not compile, or lacks the function.
    #[error("script: {0}")]
    Invalid(String),
    /// The call ran longer than the limit.
    #[error("script call cut off after {0} ms (the time limit)")]
    Timeout(u64),
    /// The runtime ran out of its memory limit.
    #[error("script call ran out of its {0} MiB memory limit")]
    Memory(usize),
    /// The script threw.
    #[error("script error: {0}")]
    Thrown(String),
    /// The result is not what the contract says.
    #[error("script result: {0}")]
    BadResult(String),
    /// The script's thread is gone.
    #[error("the script host stopped")]
    Gone,
}

/// What to call.
#[derive(Debug, Clone)]
pub enum Call {
    /// `rawDataToProtocol(bytes)`.
    Decode(Vec<u8>),
    /// `protocolToRawData(json)`.
    Encode(Value),
    /// `transformPayload(topic, bytes)`.
    Transform(String, Vec<u8>),
}

impl Call {
    fn function(&self) -> &'static str {
        match self {
            Call::Decode(_) => "rawDataToProtocol",
            Call::Encode(_) => "protocolToRawData",
            Call::Transform(..) => "transformPayload",
        }
    }
}

/// The answer of a call: JSON, or bytes for `Encode`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// JSON.
    Json(Value),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// Counters of one product's script.
#[derive(Debug, Default)]
pub struct ScriptCounters {
    /// Calls that returned.
    pub ok: AtomicU64,
    /// Calls that threw or returned something wrong.
    pub errors: AtomicU64,
    /// Calls cut off at the time limit.
    pub timeouts: AtomicU64,
    /// Calls over the memory limit.
    pub memory: AtomicU64,
    /// Time in calls, µs.
    pub time_us: AtomicU64,
}

struct Req {
    call: Call,
    reply: oneshot::Sender<Result<Answer, ScriptError>>,
}

#[derive(Debug)]
struct Host {
    tx: smpsc::Sender<Req>,
    counters: Arc<ScriptCounters>,
}

/// Every product's script.
#[derive(Debug)]
pub struct Scripts {
    limits: Limits,
    hosts: RwLock<HashMap<String, Arc<Host>>>,
}

impl Scripts {
    /// No scripts yet.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            hosts: RwLock::new(HashMap::new()),
        }
    }

    /// The limits calls run under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Compiles and installs a product's script (replacing the previous one).
    pub async fn set(&self, pk: &str, source: &str) -> Result<(), ScriptError> {
        let host = start_host(source.to_owned(), self.limits).await?;
        self.hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pk.to_owned(), Arc::new(host));
        Ok(())
    }

    /// Removes a product's script.
    pub fn remove(&self, pk: &str) {
        self.hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pk);
    }

    /// True when the product has a script.
    pub fn has(&self, pk: &str) -> bool {
        self.hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(pk)
    }

    /// Calls a product's script.
    pub async fn call(&self, pk: &str, call: Call) -> Result<Answer, ScriptError> {
        let host = self
            .hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)
            .cloned()
            .ok_or_else(|| ScriptError::NoScript(pk.to_owned()))?;
        host_call(&host, call).await
    }

    /// Runs a script that is not installed on one input (the test endpoint).
    pub async fn test(&self, source: &str, call: Call) -> Result<Answer, ScriptError> {
        let host = start_host(source.to_owned(), self.limits).await?;
        host_call(&host, call).await
    }

    /// Copies each product script's call counters into the registry.
    pub fn export_metrics(&self, r: &ironlink_telemetry::Registry) {
        let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        for (pk, h) in hosts.iter() {
            let c = &h.counters;
            for (what, v) in [
                ("ok", c.ok.load(Ordering::Relaxed)),
                ("error", c.errors.load(Ordering::Relaxed)),
                ("timeout", c.timeouts.load(Ordering::Relaxed)),
                ("memory", c.memory.load(Ordering::Relaxed)),
            ] {
                r.set_counter(
                    "ironlink_script_calls_total",
                    "Calls of a product's data-parsing script, by outcome",
                    &[("product_key", pk), ("outcome", what)],
                    v,
                );
            }
        }
    }

    /// Counters of a product's script.
    pub fn counters(&self, pk: &str) -> Option<Arc<ScriptCounters>> {
        self.hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)
            .map(|h| h.counters.clone())
    }
}

async fn host_call(host: &Host, call: Call) -> Result<Answer, ScriptError> {
    let (reply, answer) = oneshot::channel();
    host.tx
        .send(Req { call, reply })
        .map_err(|_| ScriptError::Gone)?;
    let started = Instant::now();
    let r = answer.await.map_err(|_| ScriptError::Gone)?;
    let c = &host.counters;
    c.time_us
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    match &r {
        Ok(_) => c.ok.fetch_add(1, Ordering::Relaxed),
        Err(ScriptError::Timeout(_)) => c.timeouts.fetch_add(1, Ordering::Relaxed),
        Err(ScriptError::Memory(_)) => c.memory.fetch_add(1, Ordering::Relaxed),
        Err(_) => c.errors.fetch_add(1, Ordering::Relaxed),
    };
    r
}

/// A compiled script in its runtime.
struct Engine {
    _rt: rquickjs::Runtime,
    ctx: rquickjs::Context,
    started: Arc<AtomicU64>,
    base: Instant,
}

const FUNCTIONS: [&str; 3] = ["rawDataToProtocol", "protocolToRawData", "transformPayload"];

fn exception_text(ctx: &rquickjs::Ctx<'_>, e: rquickjs::Error) -> String {
    if matches!(e, rquickjs::Error::Exception) {
        let v = ctx.catch();
        if let Some(ex) = v.as_exception() {
            let msg = ex.message().unwrap_or_default();
            return match ex.stack() {
                Some(st) if !st.trim().is_empty() => {
                    format!("{msg} ({})", st.trim().replace('\n', " "))
                }
                _ => msg,
            };
        }
        if let Some(s) = v.as_string().and_then(|s| s.to_string().ok()) {
            return s;
        }
        return format!("{v:?}");
    }
    e.to_string()
}

impl Engine {
    fn build(source: &str, limits: Limits) -> Result<Self, ScriptError> {
        let rt = rquickjs::Runtime::new().map_err(|e| ScriptError::Invalid(e.to_string()))?;
        rt.set_memory_limit(limits.memory);
        rt.set_max_stack_size(512 * 1024);
        let started = Arc::new(AtomicU64::new(u64::MAX));
        let base = Instant::now();
        let (flag, limit_ms) = (started.clone(), limits.time.as_millis() as u64);
        rt.set_interrupt_handler(Some(Box::new(move || {
            let s = flag.load(Ordering::Relaxed);
            s != u64::MAX && (base.elapsed().as_millis() as u64).saturating_sub(s) > limit_ms
        })));
        let ctx = rquickjs::Context::full(&rt).map_err(|e| ScriptError::Invalid(e.to_string()))?;
        let e = Self {
            _rt: rt,
            ctx,
            started,
            base,
        };
        e.arm();
        let compiled = e.ctx.with(|ctx| -> Result<(), ScriptError> {
            ctx.eval::<(), _>(source).map_err(|x| {
                let text = exception_text(&ctx, x);
                if e.expired(limits) {
                    ScriptError::Timeout(limits.time.as_millis() as u64)
                } else {
                    ScriptError::Invalid(format!("does not compile: {text}"))
                }
            })?;
            let g = ctx.globals();
            if !FUNCTIONS
                .iter()
                .any(|f| g.get::<_, rquickjs::Function>(*f).is_ok())
            {
                return Err(ScriptError::Invalid(format!(
                    "defines none of {}",
                    FUNCTIONS.join(", ")
                )));
            }
            Ok(())
        });
        e.disarm();
        compiled?;
        Ok(e)
    }

    fn arm(&self) {
        self.started
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.started.store(u64::MAX, Ordering::Relaxed);
    }

    fn expired(&self, limits: Limits) -> bool {
        let s = self.started.load(Ordering::Relaxed);
        s != u64::MAX
            && (self.base.elapsed().as_millis() as u64).saturating_sub(s)
                > limits.time.as_millis() as u64
    }

    fn run(&self, call: &Call, limits: Limits) -> Result<Answer, ScriptError> {
        self.arm();
        let r = self.ctx.with(|ctx| -> Result<Answer, ScriptError> {
            let name = call.function();
            let f: rquickjs::Function = ctx.globals().get(name).map_err(|_| {
                ScriptError::Invalid(format!("the script has no function {name}()"))
            })?;
            let bytes = |b: &[u8]| b.iter().map(|x| i32::from(*x)).collect::<Vec<i32>>();
            let result: Result<rquickjs::Value, rquickjs::Error> = match call {
                Call::Decode(b) => f.call((bytes(b),)),
                Call::Transform(topic, b) => f.call((topic.as_str(), bytes(b))),
                Call::Encode(v) => match ctx.json_parse(v.to_string()) {
                    Ok(arg) => f.call((arg,)),
                    Err(e) => Err(e),
                },
            };
            let v = result.map_err(|x| {
                let text = exception_text(&ctx, x);
                if self.expired(limits) {
                    ScriptError::Timeout(limits.time.as_millis() as u64)
                } else if text.contains("out of memory") {
                    ScriptError::Memory(limits.memory / (1024 * 1024))
                } else {
                    ScriptError::Thrown(text)
                }
            })?;
            let json = ctx
                .json_stringify(v)
                .map_err(|x| ScriptError::BadResult(exception_text(&ctx, x)))?
                .and_then(|s| s.to_string().ok())
                .ok_or_else(|| ScriptError::BadResult(format!("{name}() returned nothing")))?;
            let value: Value =
                serde_json::from_str(&json).map_err(|e| ScriptError::BadResult(e.to_string()))?;
            match call {
                Call::Encode(_) => {
                    let Value::Array(items) = value else {
                        return Err(ScriptError::BadResult(
                            "protocolToRawData() must return an array of bytes".into(),
                        ));
                    };
                    let mut out = Vec::with_capacity(items.len());
                    for x in items {
                        match x.as_i64() {
                            Some(n) => out.push((n & 0xff) as u8),
                            None => {
                                return Err(ScriptError::BadResult(format!(
                                    "protocolToRawData() returned {x}, not a byte"
                                )))
                            }
                        }
                    }
                    Ok(Answer::Bytes(out))
                }
                _ => {
                    if !value.is_object() {
                        return Err(ScriptError::BadResult(format!(
                            "{name}() must return an object, not {value}"
                        )));
                    }
                    Ok(Answer::Json(value))
                }
            }
        });
        self.disarm();
        r
    }
}

/// Starts a script's thread; it compiles the script there (the caller's task does not block).
async fn start_host(source: String, limits: Limits) -> Result<Host, ScriptError> {
    let (tx, rx) = smpsc::channel::<Req>();
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ironlink-script".into())
        .spawn(move || {
            let mut engine = match Engine::build(&source, limits) {
                Ok(e) => {
                    let _ = ready_tx.send(Ok(()));
                    e
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Ok(req) = rx.recv() {
                let r = engine.run(&req.call, limits);
                if matches!(r, Err(ScriptError::Timeout(_) | ScriptError::Memory(_))) {
                    // A runtime interrupted mid-call may hold half-built state: start afresh.
                    match Engine::build(&source, limits) {
                        Ok(e) => engine = e,
                        Err(e) => {
                            tracing::error!(error = %e, "script runtime could not be rebuilt");
                            let _ = req.reply.send(r);
                            return;
                        }
                    }
                }
                let _ = req.reply.send(r);
            }
        })
        .map_err(|e| ScriptError::Invalid(format!("cannot start a script thread: {e}")))?;
    match ready_rx.await {
        Ok(Ok(())) => Ok(Host {
            tx,
            counters: Arc::new(ScriptCounters::default()),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ScriptError::Gone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A script in the form of Alibaba's documented sample, checked against the documented
    /// example inputs and outputs (see the file's header).
    pub const ALIBABA_SAMPLE: &str = include_str!("../../tests/data/alibaba_sample_script.js");

    fn limits() -> Limits {
        Limits {
            time: Duration::from_millis(200),
            memory: 8 * 1024 * 1024,
        }
    }

    #[tokio::test]
    async fn the_documented_examples_of_alibabas_sample_decode_and_encode() {
        let s = Scripts::new(limits());
        s.set("pk", ALIBABA_SAMPLE).await.unwrap();
        let hex = |h: &str| hex::decode(h).unwrap();
        let Answer::Json(v) = s
            .call("pk", Call::Decode(hex("000000000100320100000000")))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            v,
            json!({"method":"thing.event.property.post","id":"1","params":{"prop_float":0,"prop_int16":50,"prop_bool":1},"version":"1.0"})
        );
        let Answer::Json(v) = s
            .call("pk", Call::Decode(hex("0300223344c8")))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            v,
            json!({"code":"200","data":{},"id":"2241348","version":"1.0"})
        );
        let set = json!({"method":"thing.service.property.set","id":"12345","version":"1.0","params":{"prop_float":123.452,"prop_int16":333,"prop_bool":1}});
        assert_eq!(
            s.call("pk", Call::Encode(set)).await.unwrap(),
            Answer::Bytes(hex("0100003039014d0142f6e76d"))
        );
        let reply = json!({"method":"thing.event.property.post","id":"12345","version":"1.0","code":200,"data":{}});
        assert_eq!(
            s.call("pk", Call::Encode(reply)).await.unwrap(),
            Answer::Bytes(hex("0200003039c8"))
        );
        let Answer::Json(v) = s
            .call(
                "pk",
                Call::Transform("/pk/dn/user/update".into(), vec![0, 5, 1]),
            )
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            v,
            json!({"topic": "/pk/dn/user/update", "prop_int16": 5, "prop_bool": 1})
        );
    }

    #[tokio::test]
    async fn a_loop_forever_is_cut_off_and_the_next_call_works() {
        let s = Scripts::new(limits());
        s.set("pk", "function rawDataToProtocol(b) { if (b[0] === 1) { while (true) {} } return {n: b.length}; }").await.unwrap();
        assert_eq!(
            s.call("pk", Call::Decode(vec![1])).await,
            Err(ScriptError::Timeout(200))
        );
        assert_eq!(
            s.call("pk", Call::Decode(vec![0, 0])).await,
            Ok(Answer::Json(json!({"n": 2})))
        );
        let c = s.counters("pk").unwrap();
        assert_eq!(c.timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(c.ok.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn memory_limit_and_errors_are_clear() {
        let s = Scripts::new(limits());
        s.set("pk", "function rawDataToProtocol(b) { var a = []; while (true) { a.push(new Array(100000).fill(1)); } }\nfunction transformPayload(t, b) { throw new Error('bad ' + t); }").await.unwrap();
        let e = s.call("pk", Call::Decode(vec![1])).await.unwrap_err();
        assert!(
            matches!(e, ScriptError::Memory(8) | ScriptError::Timeout(_)),
            "{e}"
        );
        let e = s
            .call("pk", Call::Transform("/t".into(), vec![]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bad /t"), "{e}");
        let e = s.call("pk", Call::Encode(json!({}))).await.unwrap_err();
        assert!(
            e.to_string().contains("no function protocolToRawData"),
            "{e}"
        );
        assert!(matches!(
            Scripts::new(limits()).set("p", "function (").await,
            Err(ScriptError::Invalid(_))
        ));
        assert!(matches!(
            Scripts::new(limits()).set("p", "var x = 1;").await,
            Err(ScriptError::Invalid(_))
        ));
        assert!(matches!(
            Scripts::new(limits()).set("p", "while(true){}").await,
            Err(ScriptError::Timeout(_))
        ));
        assert_eq!(
            s.call("other", Call::Decode(vec![])).await,
            Err(ScriptError::NoScript("other".into()))
        );
    }
}
