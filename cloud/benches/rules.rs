//! Rules engine benchmark: messages per second through 1, 100 and 1,000 rules on JSON
//! property posts, against the cost of parsing that JSON once (measured in the same run);
//! memory per rule; data-parsing script calls per second.
//!
//! `cargo bench -p ironlink-cloud --bench rules` (add `-- --quick` for a shorter run).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_cloud::rules::script::{Call, Limits, Scripts};
use ironlink_cloud::rules::{self, RuleSpec};
use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident memory of this process, bytes (from /proc: an upper bound of what rules keep, as
/// the allocator may hold freed memory too).
fn rss() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<i64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// A property post as rules see it (Alibaba's server-side subscription form).
fn post(i: u64) -> Vec<u8> {
    json!({
        "iotId": "pk1.dev-0001", "productKey": "pk1", "deviceName": "dev-0001",
        "requestId": i.to_string(), "gmtCreate": 1_700_000_000_000u64 + i,
        "items": {
            "temp": {"value": (i % 100) as f64 + 0.5, "time": 1_700_000_000_000u64 + i},
            "humidity": {"value": i % 100, "time": 1_700_000_000_000u64 + i},
            "state": {"value": "running", "time": 1_700_000_000_000u64 + i}
        },
        "checkFailedData": {}
    })
    .to_string()
    .into_bytes()
}

const TOPIC: &str = "/pk1/dev-0001/thing/event/property/post";

/// A post as the engine receives it.
fn incoming(raw: &[u8], at: i64) -> rules::Incoming<'_> {
    rules::Incoming {
        topic: TOPIC,
        raw,
        product_key: "pk1",
        device_name: "dev-0001",
        message_id: "1",
        at,
        tags: None,
        thing: None,
    }
}

/// Runs `f` on `msgs` until `budget` is spent; messages per second.
fn rate(msgs: &[Vec<u8>], budget: Duration, mut f: impl FnMut(&[u8])) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for m in msgs {
            f(m);
        }
        n += msgs.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 300 } else { 2_000 });
    let dir = tempfile::tempdir().unwrap();
    let mut config = ironlink_cloud::config::Config {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    config.mqtt.listen = None;
    config.mqtt.tls_listen = None;
    config.apps.amqps_listen = None;
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_token = Some("bench".into());
    config.rules.queue = 1 << 20;
    let running = ironlink_cloud::server::start(config).await.unwrap();
    let engine = running.shared.rules.clone();
    let msgs: Vec<Vec<u8>> = (0..1_000).map(post).collect();

    // Through the platform's path (`Apps::publish_many`, as a device's posts are, batches of
    // 100): one rule with a republish action, in memory and durable (committed to the rule's
    // own queue before publish_many returns, evaluated by its own task, removed once the
    // action delivered). Measured first, with no other rules in the engine.
    let path_n: u64 = if quick { 2_000 } else { 20_000 };
    let mut path_rates = Vec::new();
    for durable in [false, true] {
        let rule = engine
            .create(RuleSpec {
                name: format!("path-{durable}"),
                description: String::new(),
                sql: "SELECT items.temp.value AS t, deviceName() AS dev FROM \"/pk9/+/thing/event/property/post\"".into(),
                actions: vec![json!({"type": "republish", "topic": "/pk9/${dev}/user/out"})],
                enabled: true,
                durable,
            })
            .await
            .unwrap();
        let apps = running.shared.apps.clone();
        let counter =
            |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let done = || counter(&rule.actions[0].counters.done);
        let dropped = || counter(&rule.actions[0].counters.dropped_queue_full);
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < path_n {
            let batch = (sent..sent + 100)
                .map(|i| ironlink_cloud::apps::Outgoing {
                    product_key: "pk9".into(),
                    kind: ironlink_cloud::apps::MessageType::Property,
                    topic: "/pk9/dev-0001/thing/event/property/post".into(),
                    payload: post(i),
                    generated_at: 1_700_000_000_000 + i as i64,
                })
                .collect();
            assert!(apps.publish_many(batch).await, "publish_many failed");
            sent += 100;
            // At most 500 posts in flight (engine queue + action queue): a burst beyond the
            // action's queue bound is dropped and counted, which is not what this measures.
            while sent > done() + dropped() + 400 {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        }
        let accepted = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(600);
        while done() + dropped() < path_n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let total = start.elapsed();
        assert_eq!(
            done() + dropped(),
            path_n,
            "every output delivered or dropped"
        );
        path_rates.push((
            durable,
            dropped(),
            path_n as f64 / accepted.as_secs_f64(),
            path_n as f64 / total.as_secs_f64(),
        ));
        engine.delete(&rule.row.rule_id).await.unwrap();
    }
    println!("| one rule with a republish action, {path_n} posts through Apps::publish_many | accepted/s | delivered/s | dropped | delivered / in-memory rule |");
    println!("|---|---:|---:|---:|---:|");
    let base = path_rates[0].3;
    for (durable, dropped, accepted, delivered) in &path_rates {
        let kind = if *durable {
            "durable (at least once)"
        } else {
            "in memory (default)"
        };
        println!(
            "| {kind} | {accepted:.0} | {delivered:.0} | {dropped} | {:.2} |",
            delivered / base
        );
    }
    println!();

    let parse = rate(&msgs, budget, |m| {
        black_box(serde_json::from_slice::<Value>(m).unwrap());
    });
    let parse_ns = 1e9 / parse;
    println!("| what | messages/s | ns per message | ns per message per rule | per-rule cost / one JSON parse |");
    println!("|---|---:|---:|---:|---:|");
    println!("| baseline: serde_json parse of the post (~300 bytes) | {parse:.0} | {parse_ns:.0} | - | 1.00 |");

    let sql = "SELECT items.temp.value AS t, items.humidity.value * 2 AS h2, deviceName() AS dev \
               FROM \"/pk1/+/thing/event/property/post\" WHERE items.temp.value > 50 AND items.state.value = 'running'";
    let mut created = 0usize;
    let mut with_actions = Vec::new();
    for n in [1usize, 100, 1_000] {
        while created < n {
            // The same SQL twice: without actions (evaluation only) and with a republish action.
            // Half the posts pass WHERE.
            for (prefix, actions) in [
                ("e", vec![]),
                (
                    "r",
                    vec![
                        json!({"type": "republish", "topic": format!("/pk1/${{dev}}/user/r{created}")}),
                    ],
                ),
            ] {
                engine
                    .create(RuleSpec {
                        name: format!("{prefix}{created}"),
                        description: String::new(),
                        sql: sql.into(),
                        actions,
                        enabled: true,
                        durable: false,
                    })
                    .await
                    .unwrap();
            }
            created += 1;
        }
        let all = engine.rules();
        let pick = |p: char| -> Vec<_> {
            all.iter()
                .filter(|r| r.row.name.starts_with(p))
                .cloned()
                .collect()
        };
        let (eval_only, acting) = (pick('e'), pick('r'));
        let mut id = 0i64;
        let r = rate(&msgs, budget, |m| {
            id += 1;
            rules::evaluate(&eval_only, &incoming(m, id));
        });
        let per_msg = 1e9 / r;
        // The JSON parse happens once per message, whatever the number of rules.
        let per_rule = (per_msg - parse_ns).max(0.0) / n as f64;
        println!(
            "| {n} rule(s) reading the post, half passing: evaluation | {r:.0} | {per_msg:.0} | {per_rule:.0} | {:.2} |",
            per_rule / parse_ns
        );
        // With a republish action each: outputs go through the actions' queues and tasks;
        // each round of 1,000 posts is drained before the next.
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < budget {
            for m in &msgs {
                id += 1;
                rules::evaluate(&acting, &incoming(m, id));
            }
            done += msgs.len() as u64;
            while acting
                .iter()
                .any(|r| r.actions.iter().any(|a| a.queued() > 0))
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let r = done as f64 / start.elapsed().as_secs_f64();
        let dropped: u64 = acting
            .iter()
            .flat_map(|r| r.actions.iter())
            .map(|a| {
                a.counters
                    .dropped_queue_full
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        with_actions.push(format!(
            "| {n} | {r:.0} | {:.0} | {dropped} |",
            r * n as f64 / 2.0
        ));
    }
    println!();
    println!("| rules with a republish action | posts/s | action outputs/s | outputs dropped |");
    println!("|---:|---:|---:|---:|");
    for l in &with_actions {
        println!("{l}");
    }
    // Memory per rule, measured over a fresh batch of 2,000 rules.
    let before = rss();
    for i in 0..2_000 {
        engine
            .create(RuleSpec {
                name: format!("m{i}"),
                description: String::new(),
                sql: "SELECT items.temp.value AS t, deviceName() AS dev FROM \"/other/+/thing/event/property/post\" WHERE items.temp.value > 50".into(),
                actions: vec![json!({"type": "republish", "topic": "/other/${dev}/user/x"})],
                enabled: true,
                durable: false,
            })
            .await
            .unwrap();
    }
    let per_rule = (rss() - before) as f64 / 2_000.0;
    println!();
    println!(
        "memory per rule (2,000 rules with one republish action each, growth of the resident set): {:.1} KiB",
        per_rule / 1024.0
    );
    // 2,000 rules not reading this product: the cost of looking past them.
    let live = engine.rules();
    let others: Vec<_> = live
        .iter()
        .filter(|r| r.row.name.starts_with('m'))
        .cloned()
        .collect();
    let r = rate(&msgs, budget, |m| rules::evaluate(&others, &incoming(m, 0)));
    println!(
        "2,000 rules on another product's topic: {r:.0} messages/s ({:.0} ns per message)",
        1e9 / r
    );

    // Data-parsing script calls: the decoder in Alibaba's documented form.
    let scripts = Arc::new(Scripts::new(Limits::default()));
    scripts
        .set(
            "raw",
            include_str!("../tests/data/alibaba_sample_script.js"),
        )
        .await
        .unwrap();
    let frame = hex::decode("0000003009014d0142f6e76d").unwrap();
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        scripts
            .call("raw", Call::Decode(frame.clone()))
            .await
            .unwrap();
        calls += 1;
    }
    let seq = calls as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        let mut batch = Vec::with_capacity(64);
        for _ in 0..64 {
            let s = scripts.clone();
            let f = frame.clone();
            batch.push(tokio::spawn(
                async move { s.call("raw", Call::Decode(f)).await },
            ));
        }
        for b in batch {
            b.await.unwrap().unwrap();
        }
        calls += 64;
    }
    let pipelined = calls as f64 / start.elapsed().as_secs_f64();
    println!("script rawDataToProtocol (Alibaba-form decoder, 12-byte frame): {seq:.0} calls/s one at a time, {pipelined:.0} calls/s with 64 in flight (one product = one script thread)");
    running.shutdown().await;
}
