//! The same storage tests on SQLite and PostgreSQL. PostgreSQL runs when
//! IRONLINK_TEST_POSTGRES_URL names a database whose user may CREATE DATABASE; under CI
//! (CI=true) it is required.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_cloud::registry::{self, NewProduct};
use ironlink_cloud::storage::{Db, Engine, PresenceEvent, StorageError};
use sqlx::Connection;

struct TestDb {
    db: Db,
    _dir: Option<tempfile::TempDir>,
    pg_drop: Option<(String, String)>,
}

async fn engines() -> Vec<TestDb> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut out = vec![TestDb {
        db: Db::connect(&url).await.unwrap(),
        _dir: Some(dir),
        pg_drop: None,
    }];
    match std::env::var("IRONLINK_TEST_POSTGRES_URL") {
        Ok(admin) => {
            let name = format!("ironlink_t_{}", registry::new_secret());
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
            sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
                .await
                .unwrap();
            let base = admin.rsplit_once('/').unwrap().0;
            let url = format!("{base}/{name}");
            out.push(TestDb {
                db: Db::connect(&url).await.unwrap(),
                _dir: None,
                pg_drop: Some((admin, name)),
            });
        }
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI must set IRONLINK_TEST_POSTGRES_URL so storage tests run on PostgreSQL too")
        }
        Err(_) => eprintln!("IRONLINK_TEST_POSTGRES_URL not set: PostgreSQL variant skipped"),
    }
    out
}

async fn cleanup(dbs: Vec<TestDb>) {
    for t in dbs {
        t.db.close().await;
        if let Some((admin, name)) = t.pg_drop {
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
            let _ =
                sqlx::Executor::execute(&mut conn, format!("DROP DATABASE {name}").as_str()).await;
        }
    }
}

/// The history as the API reads it (rows and sealed chunks).
async fn history(db: &Db) -> std::sync::Arc<ironlink_cloud::tsdb::Tsdb> {
    ironlink_cloud::tsdb::Tsdb::open(
        db.clone(),
        ironlink_cloud::tsdb::TimeseriesConfig::default(),
        std::sync::Arc::default(),
    )
    .await
    .unwrap()
}

fn product(name: &str) -> NewProduct {
    serde_json::from_value(serde_json::json!({"name": name})).unwrap()
}

#[tokio::test]
async fn registry_crud_on_every_engine() {
    let dbs = engines().await;
    for t in &dbs {
        let db = &t.db;
        let e = db.engine();
        let p = registry::create_product(db, product("Meter"))
            .await
            .unwrap();
        assert_eq!(db.list_products().await.unwrap().len(), 1, "{e:?}");
        assert_eq!(
            db.get_product(&p.product_key).await.unwrap().unwrap().name,
            "Meter"
        );
        assert!(db.get_product("nope").await.unwrap().is_none());

        let made = registry::create_devices(db, &p.product_key, vec!["dev-0001".into()], 3)
            .await
            .unwrap();
        assert_eq!(made.len(), 4);
        let dup = registry::create_devices(
            db,
            &p.product_key,
            vec!["new-0001".into(), "dev-0001".into()],
            0,
        )
        .await;
        assert!(
            matches!(dup, Err(registry::RegistryError::Conflict(ref m)) if m.contains("dev-0001")),
            "{e:?}: {dup:?}"
        );
        assert!(
            db.get_device(&p.product_key, "new-0001")
                .await
                .unwrap()
                .is_none(),
            "{e:?}: batch is all or none"
        );

        let (page, total) = db
            .list_devices(&p.product_key, &Default::default(), 0, 2)
            .await
            .unwrap();
        assert_eq!((page.len(), total), (2, 4));
        let (page2, _) = db
            .list_devices(&p.product_key, &Default::default(), 2, 2)
            .await
            .unwrap();
        assert!(
            page[1].device_name < page2[0].device_name,
            "{e:?}: pages are ordered"
        );
        // Filters: stored status, and one tag whose value holds LIKE's wildcards.
        let names: Vec<String> = page.iter().map(|d| d.device_name.clone()).collect();
        assert!(db
            .set_device_tags(
                &p.product_key,
                &names[0],
                r#"{"floor":"3_a%","zone":"x\"y"}"#
            )
            .await
            .unwrap());
        let count = |status: Option<&'static str>, tag: Option<(&'static str, &'static str)>| {
            let db = db.clone();
            let pk = p.product_key.clone();
            async move {
                let f = ironlink_cloud::storage::DeviceFilter {
                    status,
                    tag,
                    name: None,
                };
                db.list_devices(&pk, &f, 0, 10).await.unwrap()
            }
        };
        let (found, total) = count(None, Some(("floor", "3_a%"))).await;
        assert_eq!(
            (total, found[0].device_name.as_str()),
            (1, names[0].as_str()),
            "{e:?}"
        );
        assert_eq!(
            count(None, Some(("floor", "3xab"))).await.1,
            0,
            "{e:?}: _ and % are literal"
        );
        assert_eq!(
            count(None, Some(("zone", "x\"y"))).await.1,
            1,
            "{e:?}: quotes"
        );
        assert_eq!(
            count(None, Some(("floor", "3"))).await.1,
            0,
            "{e:?}: whole values"
        );
        assert_eq!(count(Some("unactive"), None).await.1, 4, "{e:?}");
        assert_eq!(count(Some("online"), None).await.1, 0, "{e:?}");
        assert_eq!(
            count(Some("unactive"), Some(("floor", "3_a%"))).await.1,
            1,
            "{e:?}"
        );
        // Name search: contained text, LIKE's wildcards literal.
        let named = |text: &'static str| {
            let db = db.clone();
            let pk = p.product_key.clone();
            async move {
                let f = ironlink_cloud::storage::DeviceFilter {
                    status: None,
                    tag: None,
                    name: Some(text),
                };
                db.list_devices(&pk, &f, 0, 10).await.unwrap().1
            }
        };
        assert_eq!(named("0001").await, 1, "{e:?}");
        assert_eq!(named("ev-00").await, 1, "{e:?}");
        assert_eq!(named("dev_").await, 0, "{e:?}: _ is literal");
        assert_eq!(named("%").await, 0, "{e:?}: % is literal");

        assert!(db
            .set_device_enabled(&p.product_key, "dev-0001", false)
            .await
            .unwrap());
        assert_eq!(
            db.get_device(&p.product_key, "dev-0001")
                .await
                .unwrap()
                .unwrap()
                .enabled,
            0
        );
        assert!(!db
            .set_device_enabled(&p.product_key, "missing", false)
            .await
            .unwrap());
        assert!(db
            .set_device_secret(&p.product_key, "dev-0001", "abc")
            .await
            .unwrap());
        assert!(db.delete_device(&p.product_key, "dev-0001").await.unwrap());
        assert!(!db.delete_device(&p.product_key, "dev-0001").await.unwrap());

        let dup_product = db.insert_product(&p).await;
        assert!(
            matches!(dup_product, Err(StorageError::Conflict(_))),
            "{e:?}"
        );
        assert!(db.delete_product(&p.product_key).await.unwrap());
        assert_eq!(
            db.list_devices(&p.product_key, &Default::default(), 0, 10)
                .await
                .unwrap()
                .1,
            0,
            "{e:?}: devices go with their product"
        );
    }
    cleanup(dbs).await;
}

#[tokio::test]
async fn presence_history_and_restart_reset_on_every_engine() {
    let dbs = engines().await;
    for t in &dbs {
        let db = &t.db;
        let p = registry::create_product(db, product("P")).await.unwrap();
        let pk = p.product_key.clone();
        registry::create_devices(db, &pk, vec!["dev-0001".into()], 0)
            .await
            .unwrap();
        let ev = |status: &str, reason: &str, at: i64| PresenceEvent {
            product_key: pk.clone(),
            device_name: "dev-0001".into(),
            status: status.into(),
            reason: reason.into(),
            client_addr: Some("127.0.0.1:5000".into()),
            at,
        };
        db.record_presence(&[
            ev("online", "connected", 100),
            ev("offline", "keepalive timeout", 200),
            ev("online", "connected", 300),
        ])
        .await
        .unwrap();
        let d = db.get_device(&pk, "dev-0001").await.unwrap().unwrap();
        assert_eq!(
            (
                d.status.as_str(),
                d.first_online_at,
                d.last_online_at,
                d.last_offline_at
            ),
            ("online", Some(100), Some(300), Some(200))
        );
        assert_eq!(db.reset_online(400).await.unwrap(), 1);
        let h = db.presence_history(&pk, "dev-0001", 10).await.unwrap();
        let reasons: Vec<&str> = h.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "server restart",
                "connected",
                "keepalive timeout",
                "connected"
            ],
            "{:?}",
            db.engine()
        );
        assert_eq!(
            db.get_device(&pk, "dev-0001")
                .await
                .unwrap()
                .unwrap()
                .status,
            "offline"
        );
    }
    cleanup(dbs).await;
}

#[tokio::test]
async fn migrations_are_reversible_on_every_engine() {
    let dbs = engines().await;
    for t in &dbs {
        t.db.undo_all().await.unwrap();
        let missing = t.db.list_products().await;
        assert!(
            missing.is_err(),
            "{:?}: tables are gone after undo",
            t.db.engine()
        );
    }
    // Re-applying works too (SQLite: reopen the same file; PostgreSQL: covered by connect).
    for t in &dbs {
        if t.db.engine() == Engine::Sqlite {
            let dir = t._dir.as_ref().unwrap();
            let again = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
                .await
                .unwrap();
            assert!(again.list_products().await.unwrap().is_empty());
            again.close().await;
        }
    }
    cleanup(dbs).await;
}

#[tokio::test]
async fn presence_batches_cross_statement_chunks_on_every_engine() {
    let dbs = engines().await;
    for t in &dbs {
        let db = &t.db;
        let p = registry::create_product(db, product("Bulk")).await.unwrap();
        let pk = p.product_key.clone();
        let made = registry::create_devices(db, &pk, vec![], 450)
            .await
            .unwrap();
        // 450 devices online, then the first 100 offline again: 550 events, 450 devices.
        let mut events: Vec<PresenceEvent> = made
            .iter()
            .map(|d| PresenceEvent {
                product_key: pk.clone(),
                device_name: d.device_name.clone(),
                status: "online".into(),
                reason: "connected".into(),
                client_addr: Some("10.0.0.1:1".into()),
                at: 1000,
            })
            .collect();
        events.extend(made.iter().take(100).map(|d| PresenceEvent {
            product_key: pk.clone(),
            device_name: d.device_name.clone(),
            status: "offline".into(),
            reason: "clean disconnect".into(),
            client_addr: None,
            at: 2000,
        }));
        db.record_presence(&events).await.unwrap();
        let first = db
            .get_device(&pk, &made[0].device_name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                first.status.as_str(),
                first.last_online_at,
                first.last_offline_at
            ),
            ("offline", Some(1000), Some(2000)),
            "{:?}",
            db.engine()
        );
        assert_eq!(
            first.client_addr.as_deref(),
            Some("10.0.0.1:1"),
            "an offline change without address keeps the last one"
        );
        let last = db
            .get_device(&pk, &made[449].device_name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (last.status.as_str(), last.first_online_at),
            ("online", Some(1000))
        );
        assert_eq!(
            db.presence_history(&pk, &made[0].device_name, 10)
                .await
                .unwrap()
                .len(),
            2
        );
    }
    cleanup(dbs).await;
}

#[tokio::test]
async fn thing_model_versions_on_every_engine() {
    let dbs = engines().await;
    for t in &dbs {
        let db = &t.db;
        let p = registry::create_product(db, product("Modelled"))
            .await
            .unwrap();
        let pk = &p.product_key;
        assert!(db.get_thing_model(pk, None).await.unwrap().is_none());
        assert_eq!(
            db.put_thing_model(pk, r#"{"properties":[]}"#, 10)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            db.put_thing_model(pk, r#"{"events":[]}"#, 20)
                .await
                .unwrap(),
            2
        );
        let (v, tsl, at) = db.get_thing_model(pk, None).await.unwrap().unwrap();
        assert_eq!(
            (v, tsl.as_str(), at),
            (2, r#"{"events":[]}"#, 20),
            "{:?}",
            db.engine()
        );
        assert_eq!(db.get_thing_model(pk, Some(1)).await.unwrap().unwrap().0, 1);
        assert!(db.delete_product(pk).await.unwrap());
        assert!(
            db.get_thing_model(pk, None).await.unwrap().is_none(),
            "models go with their product"
        );
    }
    cleanup(dbs).await;
}

#[tokio::test]
async fn thing_data_on_every_engine() {
    use ironlink_cloud::thing::store::{EventRow, PropertyRow, RawRow, ServiceCall, ShadowRow};
    let dbs = engines().await;
    for t in &dbs {
        let db = &t.db;
        let e = db.engine();
        let p = registry::create_product(db, product("thing"))
            .await
            .unwrap();
        let pk = p.product_key.clone();
        registry::create_devices(db, &pk, vec!["dev-0001".into(), "gw-00001".into()], 0)
            .await
            .unwrap();
        let key = (pk.clone(), "dev-0001".to_owned(), "temp".to_owned());
        let ids = db.series_ids(std::slice::from_ref(&key)).await.unwrap();
        let sid = ids[&key];
        // Asking again finds the same series.
        assert_eq!(
            db.series_ids(std::slice::from_ref(&key)).await.unwrap()[&key],
            sid
        );
        let rows: Vec<PropertyRow> = (0..300)
            .map(|i| PropertyRow {
                series_id: sid,
                ts: 1000 + i,
                value: i.to_string(),
                history: true,
            })
            .collect();
        let ev = EventRow {
            product_key: pk.clone(),
            device_name: "dev-0001".into(),
            identifier: "alarm".into(),
            event_type: "alert".into(),
            message_id: "7".into(),
            output: "{}".into(),
            ts: 5,
        };
        let raw = RawRow {
            product_key: pk.clone(),
            device_name: "dev-0001".into(),
            direction: "up",
            payload: vec![0, 1, 255],
            ts: 6,
        };
        db.store_thing_data(&rows, &[ev], &[raw]).await.unwrap();
        // An older value does not replace the latest.
        db.store_thing_data(
            &[PropertyRow {
                series_id: sid,
                ts: 1,
                value: "-1".into(),
                history: true,
            }],
            &[],
            &[],
        )
        .await
        .unwrap();
        let latest = db.latest_properties(&pk, "dev-0001").await.unwrap();
        assert_eq!(latest, vec![("temp".to_owned(), 1299, "299".to_owned())]);
        let h = history(db)
            .await
            .range(&pk, "dev-0001", "temp", 0, i64::MAX, 5, true, None)
            .await
            .unwrap();
        assert_eq!(h.points[0], (1, serde_json::json!(-1)));
        assert_eq!(
            db.events(&pk, "dev-0001", Some("alarm"), 0, 10, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            db.events(&pk, "dev-0001", None, 0, 10, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            db.raw_messages(&pk, "dev-0001", 10).await.unwrap()[0].1,
            vec![0, 1, 255]
        );

        let call = ServiceCall {
            product_key: pk.clone(),
            device_name: "dev-0001".into(),
            message_id: "42".into(),
            identifier: "reboot".into(),
            call_type: "async".into(),
            params: "{}".into(),
            status: "pending".into(),
            code: None,
            reply: None,
            created_at: 10,
            deadline: 20,
            replied_at: None,
        };
        db.insert_call(&call).await.unwrap();
        let done = db
            .finish_call(
                &pk,
                "dev-0001",
                "42",
                "succeeded",
                Some(200),
                Some("{}"),
                15,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.status, "succeeded");
        assert!(db
            .finish_call(&pk, "dev-0001", "42", "failed", None, None, 16)
            .await
            .unwrap()
            .is_none());
        db.insert_call(&ServiceCall {
            message_id: "43".into(),
            ..call.clone()
        })
        .await
        .unwrap();
        assert_eq!(db.expire_calls(100).await.unwrap(), 1);
        assert_eq!(db.list_calls(&pk, "dev-0001", 10).await.unwrap().len(), 2);

        let s = ShadowRow {
            reported: "{}".into(),
            desired: "{\"a\":1}".into(),
            metadata: "{}".into(),
            version: 1,
            updated_at: 1,
        };
        assert!(db.put_shadow(&pk, "dev-0001", None, &s).await.unwrap());
        assert!(!db.put_shadow(&pk, "dev-0001", None, &s).await.unwrap());
        let s2 = ShadowRow {
            version: 2,
            ..s.clone()
        };
        assert!(db.put_shadow(&pk, "dev-0001", Some(1), &s2).await.unwrap());
        assert!(!db.put_shadow(&pk, "dev-0001", Some(1), &s2).await.unwrap());
        assert_eq!(
            db.get_shadow(&pk, "dev-0001")
                .await
                .unwrap()
                .unwrap()
                .version,
            2
        );

        let subs = vec![(pk.clone(), "dev-0001".to_owned())];
        db.add_topology((&pk, "gw-00001"), &subs, 1).await.unwrap();
        db.add_topology((&pk, "gw-00001"), &subs, 2).await.unwrap();
        assert_eq!(db.topology_of(&pk, "gw-00001").await.unwrap().len(), 1);
        assert!(db.gateway_of(&pk, "dev-0001").await.unwrap().is_some());
        // Many at once (a name twice in one request, over one statement's rows), looked up
        // by name in one query: only those that exist come back.
        let mut names: Vec<String> = (0..290).map(|i| format!("sub-{i:03}")).collect();
        names.push("gw-00002".into());
        registry::create_devices(db, &pk, names, 0).await.unwrap();
        let many: Vec<(String, String)> = (0..300)
            .map(|i| (pk.clone(), format!("sub-{:03}", i % 290)))
            .collect();
        db.add_topology((&pk, "gw-00002"), &many, 3).await.unwrap();
        assert_eq!(
            db.topology_of(&pk, "gw-00002").await.unwrap().len(),
            290,
            "{e:?}"
        );
        let names: Vec<String> = (280..300).map(|i| format!("sub-{i:03}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let found = db.gateways_of_named(&pk, &names).await.unwrap();
        assert_eq!(found.len(), 10, "{e:?}");
        assert_eq!(found["sub-285"].gateway_device_name, "gw-00002");
        let devices = db
            .devices_named(&pk, &["dev-0001", "nope", "dev-0001"])
            .await
            .unwrap();
        assert_eq!(devices.len(), 1, "{e:?}");
        assert_eq!(
            db.delete_topology((&pk, "gw-00002"), &many[..290])
                .await
                .unwrap()
                .len(),
            290
        );
        assert_eq!(
            db.delete_topology((&pk, "gw-00001"), &subs).await.unwrap(),
            subs
        );

        // Messages with a duplicate-dropping key: the second copy is skipped.
        let row = |v: &str| PropertyRow {
            series_id: sid,
            ts: 9000,
            value: v.into(),
            history: true,
        };
        let key = Some((pk.clone(), "dev-0001".to_owned(), "m1".to_owned()));
        let dup = db
            .store_thing_messages(
                &[
                    (key.clone(), vec![row("a")], vec![], vec![]),
                    (None, vec![row("b")], vec![], vec![]),
                ],
                1,
            )
            .await
            .unwrap();
        assert_eq!(dup, [false, false]);
        let dup = db
            .store_thing_messages(&[(key, vec![row("c")], vec![], vec![])], 2)
            .await
            .unwrap();
        assert_eq!(dup, [true]);
        let h = history(db)
            .await
            .range(&pk, "dev-0001", "temp", 9000, 9000, 10, true, None)
            .await
            .unwrap();
        assert_eq!(h.points.len(), 2, "a and b, not c");
        assert_eq!(db.expire_message_ids(3).await.unwrap(), 1);

        // Deleting the device removes its thing data.
        assert!(db.delete_device(&pk, "dev-0001").await.unwrap());
        assert!(db
            .latest_properties(&pk, "dev-0001")
            .await
            .unwrap()
            .is_empty());
        assert!(db.delete_product(&pk).await.unwrap());
    }
    cleanup(dbs).await;
}
