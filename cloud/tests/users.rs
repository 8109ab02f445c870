//! Named users, roles, API keys and the audit log through the HTTP API, on SQLite and on
//! PostgreSQL; the console's overview and a device's live stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

/// A request with another credential than the admin token.
async fn as_(
    srv: &TestServer,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = srv
        .http
        .request(method, format!("{}{path}", srv.base))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn login(srv: &TestServer, name: &str, password: &str) -> (u16, Value) {
    as_(
        srv,
        "",
        Method::POST,
        "/login",
        Some(json!({"name": name, "password": password})),
    )
    .await
}

async fn roles_keys_and_audit(srv: &TestServer) {
    let (pk, _) = srv.product(false).await;
    srv.device(&pk, "dev-0001").await;
    for (name, role) in [("olga", "operator"), ("vic", "viewer"), ("ada", "admin")] {
        let (s, v) = srv
            .post(
                "/users",
                json!({"name": name, "role": role, "password": "pass-word-1"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    // Refusals with reasons.
    let (s, v) = srv
        .post(
            "/users",
            json!({"name": "olga", "role": "viewer", "password": "pass-word-1"}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    for bad in [
        json!({"name": "admin", "role": "viewer", "password": "pass-word-1"}),
        json!({"name": "x", "role": "root", "password": "pass-word-1"}),
        json!({"name": "x", "role": "viewer", "password": "short"}),
    ] {
        let (s, v) = srv.post("/users", bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }

    let (s, v) = login(srv, "olga", "pass-word-1").await;
    assert_eq!(s, 200, "{v}");
    let op = v["token"].as_str().unwrap().to_owned();
    assert_eq!(v["key"]["role"], "operator");
    let vic = login(srv, "vic", "pass-word-1").await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = login(srv, "vic", "wrong-password").await;
    assert_eq!(s, 401, "{v}");
    let (s, _) = login(srv, "nobody", "wrong-password").await;
    assert_eq!(s, 401);
    assert_eq!(
        as_(
            srv,
            "ilk_000000000000_00000000000000000000000000000000",
            Method::GET,
            "/products",
            None
        )
        .await
        .0,
        401
    );

    // What each role may do.
    let (s, v) = as_(srv, &vic, Method::GET, "/me", None).await;
    assert_eq!(
        (s, v["name"].as_str(), v["role"].as_str()),
        (200, Some("vic"), Some("viewer"))
    );
    assert_eq!(as_(srv, &vic, Method::GET, "/products", None).await.0, 200);
    assert_eq!(
        as_(
            srv,
            &vic,
            Method::GET,
            &format!("/devices/{pk}/dev-0001"),
            None
        )
        .await
        .0,
        200
    );
    let (s, v) = as_(
        srv,
        &vic,
        Method::POST,
        "/products",
        Some(json!({"name": "no"})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("needs operator"),
        "{v}"
    );
    assert_eq!(
        as_(
            srv,
            &vic,
            Method::GET,
            &format!("/devices/{pk}/dev-0001/credentials"),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        as_(
            srv,
            &vic,
            Method::DELETE,
            &format!("/devices/{pk}/dev-0001"),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(as_(srv, &vic, Method::GET, "/users", None).await.0, 403);
    // A read that is a POST is a viewer's.
    let (s, v) = as_(
        srv,
        &vic,
        Method::POST,
        "/timeseries/query",
        Some(json!({"series": []})),
    )
    .await;
    assert_ne!(s, 403, "{v}");
    assert_eq!(
        as_(
            srv,
            &op,
            Method::GET,
            &format!("/devices/{pk}/dev-0001/credentials"),
            None
        )
        .await
        .0,
        200
    );
    let (s, v) = as_(
        srv,
        &op,
        Method::POST,
        "/products",
        Some(json!({"name": "by olga"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(as_(srv, &op, Method::GET, "/users", None).await.0, 403);
    assert_eq!(
        as_(srv, &op, Method::GET, "/access-keys", None).await.0,
        403
    );
    assert_eq!(as_(srv, &op, Method::GET, "/audit", None).await.0, 403);

    // Keys: at most the caller's role; revoked at once.
    let (s, v) = as_(
        srv,
        &op,
        Method::POST,
        "/api-keys",
        Some(json!({"label": "ci", "role": "admin"})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = as_(
        srv,
        &op,
        Method::POST,
        "/api-keys",
        Some(json!({"label": "read-only ci", "role": "viewer"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let ro = v["token"].as_str().unwrap().to_owned();
    let ro_id = v["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(as_(srv, &ro, Method::GET, "/products", None).await.0, 200);
    assert_eq!(
        as_(
            srv,
            &ro,
            Method::POST,
            "/products",
            Some(json!({"name": "no"}))
        )
        .await
        .0,
        403
    );
    let (s, v) = as_(srv, &vic, Method::GET, "/api-keys?user=olga", None).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(
        as_(
            srv,
            &vic,
            Method::DELETE,
            &format!("/api-keys/{ro_id}"),
            None
        )
        .await
        .0,
        403
    );
    let (_, mine) = as_(srv, &op, Method::GET, "/api-keys", None).await;
    let ids: Vec<&str> = mine["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&ro_id.as_str()), "{mine}");
    assert!(
        !mine.to_string().contains(&ro[20..]),
        "secrets are never listed: {mine}"
    );
    assert_eq!(
        as_(
            srv,
            &op,
            Method::DELETE,
            &format!("/api-keys/{ro_id}"),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(as_(srv, &ro, Method::GET, "/products", None).await.0, 401);
    assert_eq!(
        as_(
            srv,
            &op,
            Method::DELETE,
            &format!("/api-keys/{ro_id}"),
            None
        )
        .await
        .0,
        404
    );
    // The admin token is no user: its keys name one.
    let (s, v) = srv.post("/api-keys", json!({"label": "x"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = srv
        .post(
            "/api-keys",
            json!({"label": "for olga", "user": "olga", "expires_in_seconds": 3600}),
        )
        .await;
    assert_eq!(
        (s, v["key"]["role"].as_str()),
        (201, Some("operator")),
        "{v}"
    );
    let olga_key = v["token"].as_str().unwrap().to_owned();

    // A lower role lowers the user's sessions and keys at once; a new password ends sessions.
    let (s, v) = srv
        .call(
            Method::PATCH,
            "/users/olga",
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(
        as_(
            srv,
            &op,
            Method::POST,
            "/products",
            Some(json!({"name": "no"}))
        )
        .await
        .0,
        403
    );
    assert_eq!(
        as_(
            srv,
            &olga_key,
            Method::POST,
            "/products",
            Some(json!({"name": "no"}))
        )
        .await
        .0,
        403
    );
    let (s, _) = srv
        .call(
            Method::PATCH,
            "/users/olga",
            Some(json!({"password": "new-pass-word"})),
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(
        as_(srv, &op, Method::GET, "/products", None).await.0,
        401,
        "session ended"
    );
    assert_eq!(
        as_(srv, &olga_key, Method::GET, "/products", None).await.0,
        200,
        "keys stay"
    );
    assert_eq!(login(srv, "olga", "pass-word-1").await.0, 401);
    assert_eq!(login(srv, "olga", "new-pass-word").await.0, 200);
    // Logging out revokes the session.
    assert_eq!(as_(srv, &vic, Method::POST, "/logout", None).await.0, 204);
    assert_eq!(as_(srv, &vic, Method::GET, "/products", None).await.0, 401);
    assert_eq!(
        srv.post("/logout", json!({})).await.0,
        400,
        "the admin token is no session"
    );

    // The audit log: every change, refused ones too, newest first, paged; admins only.
    let (s, v) = srv.get("/audit?limit=1000").await;
    assert_eq!(s, 200, "{v}");
    let entries = v["entries"].as_array().unwrap();
    let has = |actor: &str, method: &str, path: &str, status: u64| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["method"] == method
                && e["path"] == path
                && e["status"] == status
        })
    };
    assert!(has("olga", "POST", "/products", 201), "{v}");
    assert!(has("vic", "POST", "/products", 403), "{v}");
    assert!(has("admin", "POST", "/users", 201), "{v}");
    assert!(has("olga", "POST", "/login", 200), "{v}");
    assert!(has("admin", "PATCH", "/users/olga", 204), "{v}");
    assert!(
        !entries.iter().any(|e| e["method"] == "GET"),
        "reads are not audited: {v}"
    );
    assert!(
        !entries.iter().any(|e| e["path"] == "/timeseries/query"),
        "{v}"
    );
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let (_, page1) = srv.get("/audit?limit=2").await;
    let next = page1["next"].as_i64().unwrap();
    let (_, page2) = srv.get(&format!("/audit?limit=2&before={next}")).await;
    assert_eq!(
        page2["entries"][0]["id"].as_i64().unwrap(),
        ids[2],
        "{page2}"
    );
    let (_, olga_only) = srv.get("/audit?actor=olga").await;
    assert!(olga_only["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] == "olga"));
    let ada = login(srv, "ada", "pass-word-1").await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(as_(srv, &ada, Method::GET, "/audit", None).await.0, 200);

    // Deleting a user ends their keys.
    assert_eq!(srv.call(Method::DELETE, "/users/olga", None).await.0, 204);
    assert_eq!(
        as_(srv, &olga_key, Method::GET, "/products", None).await.0,
        401
    );
    assert_eq!(srv.call(Method::DELETE, "/users/olga", None).await.0, 404);

    // Retention: entries older than the cut go, in batches; newer ones stay.
    let db = &srv.running.shared.db;
    let (_, all) = srv.get("/audit?limit=1000").await;
    let all = all["entries"].as_array().unwrap().clone();
    let newest_at = all[0]["at"].as_i64().unwrap();
    let oldest_at = all.last().unwrap()["at"].as_i64().unwrap();
    assert_eq!(
        ironlink_cloud::users::prune_audit(db, oldest_at)
            .await
            .unwrap(),
        0
    );
    let older = all
        .iter()
        .filter(|e| e["at"].as_i64().unwrap() < newest_at)
        .count() as u64;
    assert!(older > 0);
    assert_eq!(
        ironlink_cloud::users::prune_audit(db, newest_at)
            .await
            .unwrap(),
        older
    );
    let (_, left) = srv.get("/audit?limit=1000").await;
    assert!(
        left["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["at"].as_i64().unwrap() >= newest_at),
        "{left}"
    );
}

#[tokio::test]
async fn roles_keys_and_audit_on_sqlite() {
    let srv = start(|_| {}).await;
    roles_keys_and_audit(&srv).await;
    srv.running.shutdown().await;
}

#[tokio::test]
async fn roles_keys_and_audit_on_postgres() {
    let Some(pg) = postgres_database("ironlink_users").await else {
        return;
    };
    let srv = start(|c| c.database_url = Some(pg.url.clone())).await;
    roles_keys_and_audit(&srv).await;
    srv.running.shutdown().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn wrong_passwords_are_limited_per_name() {
    let srv = start(|_| {}).await;
    let (s, _) = srv
        .post(
            "/users",
            json!({"name": "bob", "role": "viewer", "password": "pass-word-1"}),
        )
        .await;
    assert_eq!(s, 201);
    for _ in 0..5 {
        assert_eq!(login(&srv, "bob", "guess-guess").await.0, 401);
    }
    let (s, v) = login(&srv, "bob", "pass-word-1").await;
    assert_eq!(s, 429, "even the right password waits: {v}");
    srv.running.shutdown().await;
}

#[tokio::test]
async fn overview_and_a_devices_live_stream() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "live-001").await;
    srv.device(&pk, "live-002").await;

    let resp = srv
        .http
        .get(format!("{}/devices/{pk}/live-001/live", srv.base))
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    // The stream is registered before its answer: what the device sends now is in it.
    let mut presence = srv.running.shared.presence.subscribe();
    let mut dev = device_v4(&srv, &pk, "live-001", &secret).await;
    TestServer::presence(&mut presence, "live-001", "online").await;
    let post = json!({"id": "7", "params": {"GeoLocation": {"Longitude": 120.5, "Latitude": 30.25}, "temperature": 21.5}});
    dev.publish_v4(
        &format!("/sys/{pk}/live-001/thing/event/property/post"),
        post.to_string().as_bytes(),
        rumqttc::QoS::AtLeastOnce,
        1,
    )
    .await;
    // Its PUBACK follows the commit of its values.
    tokio::time::timeout(WAIT, async {
        while !matches!(
            dev.next_v4().await,
            Some(rumqttc::mqttbytes::v4::Packet::PubAck(_))
        ) {}
    })
    .await
    .expect("PUBACK");
    let mut text = String::new();
    tokio::time::timeout(WAIT, async {
        while !(text.contains("event: presence") && text.contains("thing/event/property/post")) {
            let chunk = body.next().await.expect("stream ended").unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("events not seen: {text}"));
    assert!(text.contains("\"temperature\":21.5"), "{text}");
    assert!(text.contains("\"status\":\"online\""), "{text}");

    // The overview: devices by status, the located one on the map.
    let (s, o) = srv.get("/overview").await;
    assert_eq!(s, 200, "{o}");
    assert_eq!(o["devices"]["by_product"][&pk]["online"], 1, "{o}");
    assert_eq!(o["devices"]["by_product"][&pk]["unactive"], 1, "{o}");
    assert_eq!(o["connections"], 1, "{o}");
    assert!(o["messages_in"].as_u64().unwrap() >= 1, "{o}");
    let located = o["located"].as_array().unwrap();
    assert_eq!(located.len(), 1, "{o}");
    assert_eq!(
        (
            located[0]["longitude"].as_f64(),
            located[0]["latitude"].as_f64()
        ),
        (Some(120.5), Some(30.25))
    );
    // No stream for a device that does not exist.
    assert_eq!(
        srv.get(&format!("/devices/{pk}/nope-001/live")).await.0,
        404
    );
    drop(body);
    srv.running.shutdown().await;
}
