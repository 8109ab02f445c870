//! CoAP (RFC 7252 over UDP) for NB-IoT devices, following Alibaba Cloud IoT's CoAP access with
//! symmetric signatures as publicly documented (without DTLS and without the AES payload
//! encryption): `POST /auth` with a JSON body (`productKey`, `deviceName`, `clientId`, `sign`,
//! optional `signmethod` (hmacmd5 by default, hmacsha1, hmacsha256), `timestamp`, `seq`,
//! `version`, `resources`; the sign is the HMAC, keyed with the device secret, of every other
//! field name and value sorted by name, `version` and `resources` left out as Alibaba
//! documents (signed copies of them are accepted too)) answers 2.05 `{"token": ...}`; then `POST /topic/${topic}` with the token in option
//! 2088 publishes on the device's own Alink topics (property and event posts are queued for
//! the cloud as the device, a sub-device of the edge). Devices are keyed by their token, not by
//! their address (NAT rebinding). Confirmable retransmissions are answered from a cache
//! without being processed twice; large bodies arrive block-wise (RFC 7959 Block1, 64 KiB at
//! most); every refusal is counted by its reason. A device is online with the gateway from its
//! first post until 10 minutes after its last (as Alibaba shows CoAP devices).
//!
//! Firmware upgrades (docs/ota.md): a device posts its version on
//! `/topic/ota/device/inform/{pk}/{dn}`, asks for an upgrade with
//! `/topic/sys/{pk}/{dn}/thing/ota/firmware/get` (answered with the notice, its `url` a
//! `coap://` URL of this server), downloads the image the gateway holds with block-wise GETs
//! (RFC 7959 Block2) of `/ota/{token}`, and reports `/topic/ota/device/progress/{pk}/{dn}`;
//! all of it reaches the cloud as the device's own OTA topics.

use crate::link::Op;
use crate::vehicle::{self, Ctx, Unknown};
use ironlink_protocols::coap::{self, opt, Block, Code, Kind, Message};
use ironlink_shared::sign::{sign_parts, SignMethod};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Alibaba's option carrying the auth token.
pub const OPT_TOKEN: u16 = 2088;
/// Largest body accepted (block-wise).
pub const MAX_BODY: usize = 64 * 1024;
/// How long a token is valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Fields that never enter the signature: the signature itself and its method.
const UNSIGNED: [&str; 2] = ["sign", "signmethod"];
/// Fields Alibaba's HTTP/CoAP access documents as left out of the signature as well
/// (`version` of the auth API, `resources` the device asks for); some SDKs sign them anyway.
const UNSIGNED_DOCUMENTED: [&str; 2] = ["version", "resources"];

/// The signature Alibaba's `/auth` expects: HMAC over `k1v1k2v2...` of every field except
/// `sign`, `signmethod`, `version` and `resources`, sorted by name (Alibaba's documented
/// content: `clientId`, `deviceName`, `productKey`, and `seq` and `timestamp` when sent).
pub fn auth_sign(method: SignMethod, secret: &str, fields: &Map<String, Value>) -> String {
    sign_fields(method, secret, fields, &UNSIGNED_DOCUMENTED)
}

/// True when `sign` is the device's signature of `fields`, in the documented form or in the
/// form of SDKs that also sign `version` and `resources` (both keyed with the device secret).
pub fn auth_sign_matches(
    method: SignMethod,
    secret: &str,
    fields: &Map<String, Value>,
    sign: &str,
) -> bool {
    if auth_sign(method, secret, fields).eq_ignore_ascii_case(sign) {
        return true;
    }
    UNSIGNED_DOCUMENTED.iter().any(|k| fields.contains_key(*k))
        && sign_fields(method, secret, fields, &[]).eq_ignore_ascii_case(sign)
}

fn sign_fields(
    method: SignMethod,
    secret: &str,
    fields: &Map<String, Value>,
    also_unsigned: &[&str],
) -> String {
    let mut parts: Vec<(String, String)> = fields
        .iter()
        .filter(|(k, _)| !UNSIGNED.contains(&k.as_str()) && !also_unsigned.contains(&k.as_str()))
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect();
    parts.sort();
    let flat: Vec<&[u8]> = parts
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()])
        .collect();
    sign_parts(method, secret.as_bytes(), &flat)
        .as_str()
        .to_owned()
}

struct Partial {
    body: Vec<u8>,
    at: Instant,
}

struct State {
    ctx: Arc<Ctx>,
    /// `host:port` in the download URLs of upgrades.
    advertise: String,
    /// Devices that posted in the last 10 minutes (Alibaba shows a CoAP device online that
    /// long): routed, so the uplink keeps them logged in with the gateway.
    seen: HashMap<String, Instant>,
    calls: crate::link::Inbox,
    tokens: HashMap<String, (String, Instant)>,
    dedup: coap::Dedup<SocketAddr>,
    partial: HashMap<(SocketAddr, String), Partial>,
    next_mid: u16,
}

fn reply(req: &Message, code: Code, body: Option<Value>, mid: u16) -> Message {
    let mut r = Message::response_to(req, code, mid);
    if let Some(b) = body {
        r.add_uint(opt::CONTENT_FORMAT, 50);
        r.payload = b.to_string().into_bytes();
    }
    r
}

impl State {
    fn refuse(&self, req: &Message, code: Code, why: &'static str, mid: u16) -> Message {
        self.ctx.counters.refuse(why);
        reply(req, code, Some(json!({"message": why})), mid)
    }

    async fn handle(&mut self, from: SocketAddr, req: &Message) -> Option<Message> {
        let mid = self.next_mid;
        self.next_mid = self.next_mid.wrapping_add(1);
        if req.code == Code::EMPTY {
            // A ping (empty CON) is answered with RST; empty ACK/RST need nothing.
            return (req.kind == Kind::Con)
                .then(|| Message::new(Kind::Rst, Code::EMPTY, req.message_id, &[]));
        }
        if !req.code.is_request() {
            return None;
        }
        if let Some(n) = req.unknown_critical() {
            let _ = n;
            return Some(self.refuse(req, Code::BAD_OPTION, "unknown critical option", mid));
        }
        let path = req.path();
        if req.code == Code::GET {
            return Some(match path.strip_prefix("/ota/") {
                Some(token) => self.image(req, token, mid),
                None => self.refuse(
                    req,
                    Code::METHOD_NOT_ALLOWED,
                    "GET is for firmware images (/ota/{token}); post with POST",
                    mid,
                ),
            });
        }
        if req.code != Code::POST {
            return Some(self.refuse(
                req,
                Code::METHOD_NOT_ALLOWED,
                "only POST (and GET of firmware images)",
                mid,
            ));
        }
        // Block-wise bodies (Block1).
        let body = match req.option(opt::BLOCK1).next().map(Block::decode) {
            None => req.payload.clone(),
            Some(None) => {
                return Some(self.refuse(req, Code::BAD_OPTION, "bad Block1 option", mid))
            }
            Some(Some(b)) => {
                let key = (from, path.clone());
                let p = self.partial.entry(key.clone()).or_insert(Partial {
                    body: Vec::new(),
                    at: Instant::now(),
                });
                if b.offset() != p.body.len() {
                    self.partial.remove(&key);
                    return Some(self.refuse(req, Code::INCOMPLETE, "block out of order", mid));
                }
                if p.body.len() + req.payload.len() > MAX_BODY {
                    self.partial.remove(&key);
                    return Some(self.refuse(req, Code::TOO_LARGE, "body over 64 KiB", mid));
                }
                p.body.extend_from_slice(&req.payload);
                p.at = Instant::now();
                if b.more {
                    let mut r = reply(req, Code::CONTINUE, None, mid);
                    r.add(opt::BLOCK1, &b.encode());
                    return Some(r);
                }
                self.partial
                    .remove(&key)
                    .map(|p| p.body)
                    .unwrap_or_default()
            }
        };
        let mut answer = if path == "/auth" {
            self.auth(req, &body, mid).await
        } else if let Some(topic) = path.strip_prefix("/topic") {
            self.publish(req, topic, &body, mid)
        } else {
            self.refuse(
                req,
                Code::NOT_FOUND,
                "no such resource (/auth, /topic/...)",
                mid,
            )
        };
        if let Some(b) = req.option(opt::BLOCK1).next().and_then(Block::decode) {
            answer.add(opt::BLOCK1, &b.encode());
        }
        Some(answer)
    }

    async fn auth(&mut self, req: &Message, body: &[u8], mid: u16) -> Message {
        let Ok(Value::Object(f)) = serde_json::from_slice::<Value>(body) else {
            return self.refuse(
                req,
                Code::BAD_REQUEST,
                "auth body is not a JSON object",
                mid,
            );
        };
        let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("");
        let (pk, dn, sign) = (s("productKey"), s("deviceName"), s("sign"));
        if pk.is_empty() || dn.is_empty() || sign.is_empty() || s("clientId").is_empty() {
            return self.refuse(
                req,
                Code::BAD_REQUEST,
                "productKey, deviceName, clientId and sign are required",
                mid,
            );
        }
        if pk != self.ctx.cfg.product_key {
            return self.refuse(req, Code::FORBIDDEN, "product not served by this edge", mid);
        }
        let method = match f.get("signmethod").and_then(Value::as_str) {
            None => SignMethod::HmacMd5,
            Some(m) => match SignMethod::parse(m) {
                Some(m) => m,
                None => return self.refuse(req, Code::BAD_REQUEST, "unknown signmethod", mid),
            },
        };
        let id = match vehicle::identity(&self.ctx, dn).await {
            Ok(id) => id,
            Err(Unknown::Refused(_)) => {
                return self.refuse(
                    req,
                    Code::UNAUTHORIZED,
                    "device refused by the registry",
                    mid,
                )
            }
            Err(Unknown::Unavailable(_)) => {
                return self.refuse(
                    req,
                    Code::UNAVAILABLE,
                    "the cloud's registry is not reachable",
                    mid,
                )
            }
        };
        if !auth_sign_matches(method, &id.device_secret, &f, sign) {
            return self.refuse(req, Code::UNAUTHORIZED, "bad sign", mid);
        }
        let token = format!(
            "{:016x}{:016x}",
            vehicle::random_u64(),
            vehicle::random_u64()
        );
        self.tokens
            .retain(|_, (d, at)| d != dn && at.elapsed() < TOKEN_LIFETIME);
        self.tokens
            .insert(token.clone(), (dn.to_owned(), Instant::now()));
        reply(req, Code::CONTENT, Some(json!({"token": token})), mid)
    }

    /// One block of a firmware image (RFC 7959 Block2; 1 KiB blocks unless the device asks
    /// for smaller ones).
    fn image(&self, req: &Message, token: &str, mid: u16) -> Message {
        use std::os::unix::fs::FileExt;
        let Some(offer) = self.ctx.offers.by_token(token) else {
            return self.refuse(
                req,
                Code::NOT_FOUND,
                "no such firmware image (the upgrade ended, or the token is wrong)",
                mid,
            );
        };
        let asked = match req.option(opt::BLOCK2).next().map(Block::decode) {
            None => Block {
                num: 0,
                more: false,
                szx: 6,
            },
            Some(Some(b)) => b,
            Some(None) => return self.refuse(req, Code::BAD_OPTION, "bad Block2 option", mid),
        };
        let block = Block {
            szx: asked.szx.min(6),
            ..asked
        };
        let size = offer.notice.size;
        let start = block.num as u64 * block.size() as u64;
        if start >= size && !(start == 0 && size == 0) {
            return self.refuse(req, Code::BAD_OPTION, "block beyond the image", mid);
        }
        let end = (start + block.size() as u64).min(size);
        let mut payload = vec![0u8; (end - start) as usize];
        let read =
            std::fs::File::open(&offer.image).and_then(|f| f.read_exact_at(&mut payload, start));
        if let Err(e) = read {
            tracing::warn!(error = %e, image = %offer.image.display(), "firmware image unreadable");
            return self.refuse(
                req,
                Code::INTERNAL,
                "the firmware image cannot be read",
                mid,
            );
        }
        let mut r = Message::response_to(req, Code::CONTENT, mid);
        r.add(opt::ETAG, &offer.token.as_bytes()[..8]);
        r.add_uint(opt::CONTENT_FORMAT, 42);
        r.add(
            opt::BLOCK2,
            &Block {
                more: end < size,
                ..block
            }
            .encode(),
        );
        if block.num == 0 {
            r.add_uint(opt::SIZE2, u32::try_from(size).unwrap_or(u32::MAX));
        }
        r.payload = payload;
        r
    }

    /// OTA topics of device `dn`: its version and progress go to the cloud; firmware/get is
    /// answered from the upgrade standing for it on this gateway. `None` when `topic` is none
    /// of them.
    fn ota(
        &mut self,
        req: &Message,
        dn: &str,
        topic: &str,
        body: &[u8],
        mid: u16,
    ) -> Option<Message> {
        // Which OTA topic, before reading the body (property posts pass through untouched).
        let pk = self.ctx.cfg.product_key.clone();
        let get = topic == format!("/sys/{pk}/{dn}/thing/ota/firmware/get");
        let kind = ["inform", "progress"]
            .into_iter()
            .find(|k| topic == format!("/ota/device/{k}/{pk}/{dn}"));
        if !get && kind.is_none() {
            return None;
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) if get => json!({}),
            Err(_) => return Some(self.refuse(req, Code::BAD_REQUEST, "body is not JSON", mid)),
        };
        let id = v.get("id").cloned().unwrap_or(Value::Null);
        if get {
            let data = match self.ctx.offers.get(dn) {
                Some(o) => {
                    let mut d = o.data.clone();
                    if let Value::Object(m) = &mut d {
                        let path = format!("/ota/{}", o.token);
                        m.insert(
                            "url".into(),
                            json!(format!("coap://{}{path}", self.advertise)),
                        );
                        m.insert("path".into(), json!(path));
                    }
                    d
                }
                None => json!({}),
            };
            return Some(reply(
                req,
                Code::CONTENT,
                Some(
                    json!({"id": id, "code": 200, "data": data, "method": "thing.ota.firmware.get"}),
                ),
                mid,
            ));
        }
        let kind = kind?;
        let Some(params) = v.get("params").filter(|p| p.is_object()).cloned() else {
            return Some(self.refuse(req, Code::BAD_REQUEST, "params: an object", mid));
        };
        if kind == "inform" {
            let s = |k: &str| params.get(k).and_then(Value::as_str).unwrap_or("");
            let module = if s("module").is_empty() {
                "default"
            } else {
                s("module")
            };
            self.ctx.offers.reported(dn, module, s("version"));
        }
        if !crate::sub_ota::report(&self.ctx.sink, dn, kind, params) {
            return Some(self.refuse(
                req,
                Code::UNAVAILABLE,
                "the edge's queue refused the message",
                mid,
            ));
        }
        self.seen_now(dn);
        Some(reply(
            req,
            Code::CHANGED,
            Some(json!({"id": id, "code": 200, "data": {}})),
            mid,
        ))
    }

    /// The device spoke: it stays routed (online with the gateway) for 10 minutes.
    fn seen_now(&mut self, dn: &str) {
        if self.seen.insert(dn.to_owned(), Instant::now()).is_none() {
            self.ctx.subs.route(dn, self.calls.clone());
        }
    }

    fn publish(&mut self, req: &Message, topic: &str, body: &[u8], mid: u16) -> Message {
        let token = req
            .option(OPT_TOKEN)
            .next()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        let Some((dn, _)) = self
            .tokens
            .get(&token)
            .filter(|(_, at)| at.elapsed() < TOKEN_LIFETIME)
            .cloned()
        else {
            return self.refuse(
                req,
                Code::UNAUTHORIZED,
                "no valid token (option 2088): POST /auth first",
                mid,
            );
        };
        if let Some(answer) = self.ota(req, &dn, topic, body, mid) {
            return answer;
        }
        let pk = &self.ctx.cfg.product_key;
        let own = format!("/sys/{pk}/{dn}/thing/event/");
        let Some(rest) = topic
            .strip_prefix(&own)
            .and_then(|r| r.strip_suffix("/post"))
        else {
            return self.refuse(
                req,
                Code::FORBIDDEN,
                "not a property or event post, or an OTA topic, of this device",
                mid,
            );
        };
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return self.refuse(req, Code::BAD_REQUEST, "body is not JSON", mid);
        };
        let Some(params) = v.get("params").and_then(Value::as_object).cloned() else {
            return self.refuse(req, Code::BAD_REQUEST, "params: an object", mid);
        };
        let queued = if rest == "property" {
            vehicle::post(&self.ctx, &dn, params)
        } else {
            let time = params
                .get("time")
                .and_then(Value::as_i64)
                .unwrap_or_else(crate::now_ms);
            let value = params
                .get("value")
                .cloned()
                .unwrap_or(Value::Object(params));
            vehicle::event(&self.ctx, &dn, rest, time, value)
        };
        if !queued {
            return self.refuse(
                req,
                Code::UNAVAILABLE,
                "the edge's queue refused the message",
                mid,
            );
        }
        self.seen_now(&dn);
        self.ctx
            .counters
            .frames
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        reply(
            req,
            Code::CHANGED,
            Some(
                json!({"id": v.get("id").cloned().unwrap_or(Value::Null), "code": 200, "data": {}}),
            ),
            mid,
        )
    }
}

/// Serves CoAP on `sock` until stopped.
pub async fn serve(sock: UdpSocket, ctx: Arc<Ctx>, advertise: String) {
    let (calls_tx, mut calls) = crate::link::inbox(64);
    let mut st = State {
        ctx: ctx.clone(),
        advertise,
        seen: HashMap::new(),
        calls: calls_tx,
        tokens: HashMap::new(),
        dedup: coap::Dedup::new(100_000, 247_000),
        partial: HashMap::new(),
        next_mid: 1,
    };
    let mut stop = ctx.stop.clone();
    let mut buf = vec![0u8; 2048];
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let req = match coap::parse(&buf[..n]) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::info!(%from, error = %e, "CoAP datagram dropped");
                        st.ctx.counters.refuse("malformed CoAP message");
                        // A CON we can read the header of gets a RST (RFC 7252 §4.2).
                        if n >= 4 && buf[0] >> 6 == 1 && (buf[0] >> 4) & 3 == 0 {
                            let rst = Message::new(Kind::Rst, Code::EMPTY, u16::from_be_bytes([buf[2], buf[3]]), &[]);
                            let _ = sock.send_to(&coap::encode(&rst), from).await;
                        }
                        continue;
                    }
                };
                // GETs (image blocks) are idempotent: a retransmission is answered again
                // rather than kept in the cache.
                let cached = req.kind == Kind::Con && req.code != Code::EMPTY && req.code != Code::GET;
                if cached {
                    match st.dedup.check(&from, req.message_id, crate::now_ms()) {
                        Some(Some(answer)) => {
                            st.ctx.counters.refuse("retransmission (answered from cache)");
                            let _ = sock.send_to(&answer, from).await;
                            continue;
                        }
                        Some(None) => continue,
                        None => {}
                    }
                }
                if let Some(answer) = st.handle(from, &req).await {
                    let bytes = coap::encode(&answer);
                    if cached {
                        st.dedup.answered(&from, req.message_id, bytes.clone());
                    }
                    let _ = sock.send_to(&bytes, from).await;
                }
            }
            Some(cmd) = calls.recv() => match &cmd.op {
                // The device pulls it (firmware/get): the offer stands until it informs.
                Op::Upgrade(_) => vehicle::answer(*cmd, 200, json!({}), ""),
                _ => vehicle::answer(*cmd, 460, json!({}), "a CoAP device takes no calls from the cloud (it only posts)"),
            },
            _ = sweep.tick() => {
                st.partial.retain(|_, p| p.at.elapsed() < Duration::from_secs(60));
                let gone: Vec<String> = st
                    .seen
                    .iter()
                    .filter(|(_, at)| at.elapsed() > Duration::from_secs(600))
                    .map(|(dn, _)| dn.clone())
                    .collect();
                for dn in gone {
                    st.seen.remove(&dn);
                    st.ctx.subs.unroute(&dn, &st.calls);
                }
                st.tokens.retain(|_, (_, at)| at.elapsed() < TOKEN_LIFETIME);
            }
            _ = stop.changed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Alibaba's documentation: content is every field but sign/signmethod,
    /// sorted by name, names and values concatenated.
    #[test]
    fn the_auth_sign_covers_sorted_fields() {
        let f: Map<String, Value> = serde_json::from_value(json!({
            "productKey": "a1NUjcV", "deviceName": "ff1a11", "clientId": "a1NUjcV&ff1a11",
            "seq": "10", "timestamp": "1524448722000", "sign": "x", "signmethod": "hmacmd5"
        }))
        .unwrap();
        let content =
            b"clientIda1NUjcV&ff1a11deviceNameff1a11productKeya1NUjcVseq10timestamp1524448722000";
        let want = sign_parts(SignMethod::HmacMd5, b"secret", &[content]);
        assert_eq!(auth_sign(SignMethod::HmacMd5, "secret", &f), want.as_str());
    }

    /// A device sending every documented field (`version` and `resources` too) signs only
    /// the identity fields, as Alibaba documents; it authenticates, and so does one that
    /// signed all fields. A signature keyed with another secret never does.
    #[test]
    fn version_and_resources_stay_out_of_the_signature() {
        let f: Map<String, Value> = serde_json::from_value(json!({
            "version": "default", "resources": "/topic/x", "productKey": "a1NUjcV",
            "deviceName": "ff1a11", "clientId": "a1NUjcV&ff1a11", "seq": "10",
            "timestamp": "1524448722000", "sign": "x", "signmethod": "hmacsha1"
        }))
        .unwrap();
        let documented =
            b"clientIda1NUjcV&ff1a11deviceNameff1a11productKeya1NUjcVseq10timestamp1524448722000";
        let sign = sign_parts(SignMethod::HmacSha1, b"secret", &[documented]);
        assert!(auth_sign_matches(
            SignMethod::HmacSha1,
            "secret",
            &f,
            sign.as_str()
        ));
        let all = b"clientIda1NUjcV&ff1a11deviceNameff1a11productKeya1NUjcVresources/topic/xseq10timestamp1524448722000versiondefault";
        let sign = sign_parts(SignMethod::HmacSha1, b"secret", &[all]);
        assert!(auth_sign_matches(
            SignMethod::HmacSha1,
            "secret",
            &f,
            sign.as_str()
        ));
        let sign = sign_parts(SignMethod::HmacSha1, b"other", &[documented]);
        assert!(!auth_sign_matches(
            SignMethod::HmacSha1,
            "secret",
            &f,
            sign.as_str()
        ));
    }
}
