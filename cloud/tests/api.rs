//! HTTP API: errors a client can act on, auth, batches, paging, OpenAPI, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn bad_requests_get_clear_4xx() {
    let srv = start(|_| {}).await;
    let url = format!("{}/products", srv.base);

    let r = srv
        .http
        .post(&url)
        .bearer_auth("test-token")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], "invalid_json");
    assert!(
        v["message"].as_str().unwrap().contains("request body"),
        "{v}"
    );

    let r = srv.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["code"],
        "unauthorized"
    );
    let r = srv
        .http
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let (s, v) = srv.get("/products/a1nothere").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
    assert!(v["message"].as_str().unwrap().contains("a1nothere"));
    let (s, _) = srv
        .post(
            "/products/a1nothere/devices",
            json!({"device_name": "dev-0001"}),
        )
        .await;
    assert_eq!(s, 404);

    let (s, v) = srv
        .post("/products", json!({"name": "x", "node_type": "robot"}))
        .await;
    assert_eq!(s, 400);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("direct, gateway, sub-device"),
        "{v}"
    );
    let (s, _) = srv.post("/products", json!({"name": ""})).await;
    assert_eq!(s, 400);
    let (s, v) = srv
        .post("/products", json!({"name": "x", "colour": "red"}))
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_json")), "{v}");

    let (pk, _) = srv.product(false).await;
    srv.device(&pk, "dev-0001").await;
    let (s, v) = srv
        .post(
            &format!("/products/{pk}/devices"),
            json!({"device_name": "dev-0001"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("conflict")));
    let (s, v) = srv
        .post(
            &format!("/products/{pk}/devices"),
            json!({"device_name": "a b"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = srv.get(&format!("/devices/{pk}/nobody")).await;
    assert_eq!(s, 404);
    let (s, v) = srv.get("/no/such/route").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn batches_paging_and_product_deletion() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let (s, v) = srv
        .post(
            &format!("/products/{pk}/devices"),
            json!({"count": 25, "device_names": ["named-01"]}),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(v["devices"].as_array().unwrap().len(), 26);
    let (s, v) = srv
        .post(&format!("/products/{pk}/devices"), json!({}))
        .await;
    assert_eq!(s, 201, "one generated device");
    assert_eq!(v["device_name"].as_str().unwrap().len(), 20);
    let (_, page) = srv
        .get(&format!("/products/{pk}/devices?page=2&page_size=10"))
        .await;
    assert_eq!(page["devices"].as_array().unwrap().len(), 10);
    assert_eq!(page["total"], 27);
    // A name in both `device_name` and `device_names` is one device (the schema allows it).
    let (s, v) = srv
        .post(
            &format!("/products/{pk}/devices"),
            json!({"device_name": "both-01", "device_names": ["both-01", "both-02"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let names: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["both-01", "both-02"]);
    let (s, v) = srv
        .post(
            &format!("/products/{pk}/devices"),
            json!({"device_names": ["twice-01", "twice-01"]}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    let (s, _) = srv.get(&format!("/products/{pk}/devices?page=0")).await;
    assert_eq!(s, 400);
    let (s, _) = srv
        .post(&format!("/products/{pk}/devices"), json!({"count": 1001}))
        .await;
    assert_eq!(s, 400);

    let (s, _) = srv
        .call(reqwest::Method::DELETE, &format!("/products/{pk}"), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = srv.get(&format!("/products/{pk}/devices")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn products_update_and_device_tags() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let (s, p) = srv
        .call(
            reqwest::Method::PATCH,
            &format!("/products/{pk}"),
            Some(json!({"dynamic_register": true, "description": "line 3"})),
        )
        .await;
    assert_eq!(
        (
            s,
            p["dynamic_register"].as_bool(),
            p["description"].as_str()
        ),
        (200, Some(true), Some("line 3")),
        "{p}"
    );
    srv.device(&pk, "tagged-1").await;
    let (s, d) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{pk}/tagged-1/tags"),
            Some(json!({"site": "plant-2", "line": "3"})),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["tags"]["site"], "plant-2");
    let (s, _) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{pk}/tagged-1/tags"),
            Some(json!({"n": 1})),
        )
        .await;
    assert_eq!(s, 400, "tag values are strings");
    let (s, _) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{pk}/nobody-1/tags"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 404);
}

/// The whole device path on PostgreSQL (when IRONLINK_TEST_POSTGRES_URL is set; CI sets it).
#[tokio::test]
async fn devices_connect_and_presence_is_stored_on_postgres() {
    let Some(pg) = postgres_database("ironlink_e2e").await else {
        return;
    };
    let srv = start(|c| c.database_url = Some(pg.url.clone())).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "pg-dev-1").await;
    let mut presence = srv.running.shared.presence.subscribe();
    let c = device_v4(&srv, &pk, "pg-dev-1", &secret).await;
    TestServer::presence(&mut presence, "pg-dev-1", "online").await;
    drop(c);
    TestServer::presence(&mut presence, "pg-dev-1", "offline").await;
    let (_, h) = srv.get(&format!("/devices/{pk}/pg-dev-1/presence")).await;
    let reasons: Vec<&str> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons[1], "connected", "{h}");
    assert!(reasons[0].starts_with("connection lost"), "{h}");
    srv.running.shutdown().await;
    pg.drop_db().await;
}

#[tokio::test]
async fn openapi_and_metrics_are_served() {
    let srv = start(|_| {}).await;
    let v: serde_json::Value = srv
        .http
        .get(format!("{}/openapi.json", srv.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        v["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        v["openapi"]
    );
    // Types of the same Rust name each keep their own schema (one used to replace the other:
    // `/access-keys` was documented with the body of `/api-keys`).
    let schemas = &v["components"]["schemas"];
    for (name, field) in [
        ("NewKey", "description"),
        ("NewApiKey", "label"),
        ("Job", "module"),
        ("AnalyticsJob", "query"),
        ("CampaignPolicy", "pushes_per_minute"),
        ("Policy", "identifier"),
    ] {
        assert!(
            schemas[name].to_string().contains(&format!("\"{field}\"")),
            "{name}.{field}: {}",
            schemas[name]
        );
    }
    for path in [
        "/products",
        "/products/{pk}/devices",
        "/devices/{pk}/{dn}/messages",
        "/products/{pk}/broadcast",
        "/products/{pk}/thing-model",
        "/devices/{pk}/{dn}/properties",
        "/devices/{pk}/{dn}/properties/get",
        "/devices/{pk}/{dn}/properties/{id}/history",
        "/devices/{pk}/{dn}/events",
        "/devices/{pk}/{dn}/services/{id}",
        "/devices/{pk}/{dn}/service-calls",
        "/devices/{pk}/{dn}/service-calls/{id}",
        "/devices/{pk}/{dn}/shadow",
        "/devices/{pk}/{dn}/sub-devices",
        "/devices/{pk}/{dn}/raw",
        "/access-keys",
        "/consumer-groups",
        "/consumer-groups/{id}",
        "/subscriptions",
        "/devices/{pk}/{dn}/credentials",
        "/products/{pk}/credentials",
        "/rules",
        "/products/{pk}/script",
    ] {
        assert!(v["paths"][path].is_object(), "{path} documented");
    }
    // Generated from the handlers: every operation has an id, a tag, its success and the
    // errors every handler can give, each with a schema.
    let mut ids = std::collections::HashSet::new();
    for (path, item) in v["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}"));
            assert!(ids.insert(id.to_owned()), "{id} twice");
            assert!(op["tags"][0].is_string(), "{id}");
            let r = op["responses"].as_object().unwrap();
            assert!(r.keys().any(|k| k.starts_with('2')), "{id}: {r:?}");
            for code in ["400", "401", "503"] {
                assert!(
                    r[code]["content"]["application/json"]["schema"].is_object(),
                    "{id}: {code}"
                );
            }
        }
    }
    assert!(ids.len() >= 56, "{}", ids.len());
    let text = srv
        .http
        .get(format!("http://{}/metrics", srv.running.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("ironlink_mqtt_connections 0"), "{text}");
}

#[tokio::test]
async fn thing_models_import_with_versions_and_refuse_bad_specs_by_path() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let path = format!("/products/{pk}/thing-model");
    let (s, v) = srv.get(&path).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));

    for (name, template) in [
        (
            "electricity-meter",
            include_str!("../../docs/tsl-templates/electricity-meter.json"),
        ),
        (
            "temperature-humidity-sensor",
            include_str!("../../docs/tsl-templates/temperature-humidity-sensor.json"),
        ),
    ] {
        let body: serde_json::Value = serde_json::from_str(template).unwrap();
        let (s, v) = srv.call(reqwest::Method::PUT, &path, Some(body)).await;
        assert_eq!(s, 200, "{name}: {v}");
    }
    let (_, latest) = srv.get(&path).await;
    assert_eq!(latest["version"], 2);
    assert_eq!(
        latest["tsl"]["properties"][0]["identifier"],
        "CurrentTemperature"
    );
    let (_, first) = srv.get(&format!("{path}?version=1")).await;
    assert_eq!(first["tsl"]["properties"][0]["identifier"], "Voltage");
    let (s, _) = srv.get(&format!("{path}?version=9")).await;
    assert_eq!(s, 404);

    let bad = json!({"properties": [{"identifier": "t", "dataType": {"type": "int", "specs": {"min": "10", "max": "1"}}}]});
    let (s, v) = srv.call(reqwest::Method::PUT, &path, Some(bad)).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_thing_model")));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("properties[0].dataType.specs.max"),
        "{v}"
    );
    let (_, still) = srv.get(&path).await;
    assert_eq!(
        still["version"], 2,
        "a refused model does not create a version"
    );

    let (s, _) = srv
        .call(
            reqwest::Method::PUT,
            "/products/a1nothere/thing-model",
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = srv
        .call(reqwest::Method::DELETE, &format!("/products/{pk}"), None)
        .await;
    assert_eq!(s, 200, "a product with thing models can be deleted");
}

/// Every refusal is the JSON error object, query strings included; misspelt parameters are
/// refused instead of ignored; 401s say how to authenticate; optional bodies are checked.
#[tokio::test]
async fn every_error_is_json_and_unknown_query_parameters_are_refused() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let get = |path: String| {
        let http = srv.http.clone();
        let url = format!("{}{path}", srv.base);
        async move {
            let r = http
                .get(url)
                .bearer_auth("test-token")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (status, ct, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    for path in [
        format!("/products/{pk}/devices?page=abc"),
        format!("/products/{pk}/devices?statu=online"),
        format!("/products/{pk}/devices?status=sleeping"),
        format!("/products/{pk}/devices?tag=nocolon"),
        format!("/products/{pk}/thing-model?version=x"),
        "/rules/x/dead-letters?limit=1&bogus=2".to_owned(),
    ] {
        let (s, ct, v) = get(path.clone()).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        assert!(
            v["code"].is_string() && v["message"].is_string(),
            "{path}: {v}"
        );
    }
    // A method the path does not take: still the JSON error object.
    let r = srv
        .http
        .put(format!("{}/products", srv.base))
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], "method_not_allowed", "{v}");
    // 401 names the scheme.
    let r = srv
        .http
        .get(format!("{}/products", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r
        .headers()
        .get("www-authenticate")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    // An optional body that is there must be right.
    for (body, status) in [("{\"descripton\": 1}", 422), ("{oops", 400)] {
        let r = srv
            .http
            .post(format!("{}/access-keys", srv.base))
            .bearer_auth("test-token")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
    }
    let r = srv
        .http
        .post(format!("{}/products/{pk}/devices", srv.base))
        .bearer_auth("test-token")
        .header("content-type", "application/json")
        .body("{\"device_nam\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "a misspelt field is not an empty body");
    // Filters that exist work.
    srv.device(&pk, "tagged-01").await;
    srv.device(&pk, "plain-001").await;
    let r = srv
        .http
        .put(format!("{}/devices/{pk}/tagged-01/tags", srv.base))
        .bearer_auth("test-token")
        .json(&json!({"site": "north"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _, v) = get(format!(
        "/products/{pk}/devices?tag=site:north&status=unactive"
    ))
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["devices"][0]["device_name"], "tagged-01");
}

/// Secrets leave the API only at creation and through the credentials calls.
#[tokio::test]
async fn secrets_are_shown_only_on_creation_and_through_credentials() {
    let srv = start(|_| {}).await;
    let (pk, product_secret) = srv.product(true).await;
    let secret = srv.device(&pk, "secret-01").await;
    let (_, v) = srv.get("/products").await;
    assert!(!v.to_string().contains(&product_secret), "{v}");
    let (_, v) = srv.get(&format!("/products/{pk}")).await;
    assert!(v.get("product_secret").is_none(), "{v}");
    let (_, v) = srv.get(&format!("/products/{pk}/devices")).await;
    assert!(!v.to_string().contains(&secret), "{v}");
    let (_, v) = srv.get(&format!("/devices/{pk}/secret-01")).await;
    assert!(v.get("device_secret").is_none(), "{v}");
    let (s, v) = srv
        .get(&format!("/devices/{pk}/secret-01/credentials"))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["device_secret"], secret.as_str());
    assert_eq!(v["mqtt_port"], srv.mqtt().port());
    assert_eq!(v["mqtts_port"], srv.mqtts().port());
    let (s, v) = srv.get(&format!("/products/{pk}/credentials")).await;
    assert_eq!(
        (s, v["product_secret"].as_str()),
        (200, Some(product_secret.as_str()))
    );
}

/// A document that is not a thing model is refused with the offending key, and Alibaba's
/// export form of an int array (items without specs) is taken.
#[tokio::test]
async fn thing_model_documents_that_are_not_models_are_refused() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let path = format!("/products/{pk}/thing-model");
    let put = |body: serde_json::Value| srv.call(reqwest::Method::PUT, &path, Some(body));
    let (s, v) = put(json!({"foo": 1})).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_thing_model")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("foo"), "{v}");
    let (s, v) = put(json!({"propertys": []})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put(json!({"properties": []})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put(
        json!({"properties": [{"identifier": "levels", "name": "Levels", "accessMode": "rw",
        "dataType": {"type": "array", "specs": {"size": "4", "item": {"type": "int"}}}}]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

/// Names shown in logs, terminals and exports refuse control characters.
#[tokio::test]
async fn names_refuse_control_characters() {
    let srv = start(|_| {}).await;
    for name in ["bad\u{1b}[31mred", "line\nbreak", "nul\u{0}"] {
        let (s, v) = srv.post("/products", json!({"name": name})).await;
        assert_eq!(s, 400, "{name:?}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("control character"),
            "{v}"
        );
    }
    let (s, v) = srv
        .post("/consumer-groups", json!({"name": "g\u{7}"}))
        .await;
    assert_eq!(s, 400, "{v}");
    let (pk, _) = srv.product(false).await;
    let (s, v) = srv
        .call(
            reqwest::Method::PATCH,
            &format!("/products/{pk}"),
            Some(json!({"name": "x\ty"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
}
