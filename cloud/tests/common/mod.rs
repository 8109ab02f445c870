//! Test helpers: an in-process server on ephemeral ports, an API client, and a raw MQTT
//! client that shows exactly what the server sends.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use ironlink_cloud::config::Config;
use ironlink_cloud::server::{self, Running};
use ironlink_shared::sign::SignMethod;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait in these tests is for an event, bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct TestServer {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub base: String,
}

pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    c.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
    c.mqtt.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    c.apps.amqps_listen = Some("127.0.0.1:0".parse().unwrap());
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_token = Some("test-token".into());
    tweak(&mut c);
    let running = server::start(c).await.unwrap();
    let base = format!("http://{}/api/v1", running.http_addr);
    TestServer {
        running,
        dir,
        http: reqwest::Client::new(),
        base,
    }
}

impl TestServer {
    pub fn mqtt(&self) -> SocketAddr {
        self.running.mqtt_addr.unwrap()
    }

    pub fn mqtts(&self) -> SocketAddr {
        self.running.mqtts_addr.unwrap()
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth("test-token");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Creates a product; returns (product key, product secret).
    pub async fn product(&self, dynamic_register: bool) -> (String, String) {
        let (s, v) = self
            .post(
                "/products",
                json!({"name": "test", "dynamic_register": dynamic_register}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["product_key"].as_str().unwrap().to_owned(),
            v["product_secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a product from `body` and imports `tsl` as its thing model; returns its key.
    pub async fn product_with_model(&self, body: Value, tsl: &str) -> String {
        let (s, v) = self.post("/products", body).await;
        assert_eq!(s, 201, "{v}");
        let pk = v["product_key"].as_str().unwrap().to_owned();
        let tsl: Value = serde_json::from_str(tsl).unwrap();
        let (s, v) = self
            .call(
                reqwest::Method::PUT,
                &format!("/products/{pk}/thing-model"),
                Some(tsl),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        pk
    }

    /// Creates a device; returns its secret.
    pub async fn device(&self, pk: &str, dn: &str) -> String {
        let (s, v) = self
            .post(
                &format!("/products/{pk}/devices"),
                json!({"device_name": dn}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["device_secret"].as_str().unwrap().to_owned()
    }

    /// Waits for the presence change of `dn` with `status`; returns its reason.
    pub async fn presence(
        rx: &mut tokio::sync::broadcast::Receiver<ironlink_cloud::storage::PresenceEvent>,
        dn: &str,
        status: &str,
    ) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = rx.recv().await.unwrap();
                if e.device_name == dn && e.status == status {
                    return e.reason;
                }
            }
        })
        .await
        .expect("presence event")
    }
}

/// (client id, username, password) for a device.
pub fn creds(
    pk: &str,
    dn: &str,
    secret: &str,
    method: SignMethod,
    tls: bool,
) -> (String, String, String) {
    let v = ironlink_cloud::cli::credentials(
        pk,
        dn,
        secret,
        method,
        tls,
        ironlink_cloud::registry::now_ms(),
    );
    (
        v["client_id"].as_str().unwrap().to_owned(),
        v["username"].as_str().unwrap().to_owned(),
        v["password"].as_str().unwrap().to_owned(),
    )
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw MQTT client.
pub struct Raw {
    pub s: Box<dyn Io>,
    buf: BytesMut,
}

impl Raw {
    pub async fn tcp(addr: SocketAddr) -> Self {
        Self {
            s: Box::new(TcpStream::connect(addr).await.unwrap()),
            buf: BytesMut::new(),
        }
    }

    /// TLS with the server's generated development CA.
    pub async fn tls(addr: SocketAddr, ca: &std::path::Path) -> Self {
        let pem = std::fs::read(ca).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let s = connector.connect(name, tcp).await.unwrap();
        Self {
            s: Box::new(s),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed; tests then observe that through reads.
        let _ = self.s.write_all(bytes).await;
    }

    async fn fill(&mut self) -> bool {
        match tokio::time::timeout(WAIT, self.s.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
            Err(_) => panic!("no data and no close within {WAIT:?}"),
        }
    }

    /// Next MQTT 3.1.1 packet; `None` when the server closed the connection.
    pub async fn next_v4(&mut self) -> Option<v4::Packet> {
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !self.fill().await {
                        return None;
                    }
                }
                Err(e) => panic!("server sent a malformed packet: {e:?}"),
            }
        }
    }

    /// Next MQTT 5 packet; `None` when the server closed the connection.
    pub async fn next_v5(&mut self) -> Option<v5::Packet> {
        loop {
            match v5::Packet::read(&mut self.buf, Some(1 << 20)) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !self.fill().await {
                        return None;
                    }
                }
                Err(e) => panic!("server sent a malformed packet: {e:?}"),
            }
        }
    }

    /// True once the server has closed the connection (packets before that are skipped).
    pub async fn closed(&mut self) -> bool {
        loop {
            self.buf.clear();
            if !self.fill().await {
                return true;
            }
        }
    }

    pub async fn connect_v4(
        &mut self,
        cid: &str,
        user: &str,
        pass: &str,
        keep_alive: u16,
    ) -> v4::ConnectReturnCode {
        let mut c = v4::Connect::new(cid);
        c.keep_alive = keep_alive;
        c.set_login(user, pass);
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        self.send(&b).await;
        match self.next_v4().await {
            Some(v4::Packet::ConnAck(a)) => a.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn connect_v5(&mut self, cid: &str, user: &str, pass: &str) -> v5::ConnectReturnCode {
        let c = v5::Connect {
            keep_alive: 60,
            client_id: cid.into(),
            clean_start: true,
            properties: None,
        };
        let mut b = BytesMut::new();
        v5::Packet::Connect(c, None, Some(v5::Login::new(user, pass)))
            .write(&mut b, None)
            .unwrap();
        self.send(&b).await;
        match self.next_v5().await {
            Some(v5::Packet::ConnAck(a)) => a.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn subscribe_v4(&mut self, filter: &str, pkid: u16) -> Vec<v4::SubscribeReasonCode> {
        let mut s = v4::Subscribe::new(filter, rumqttc::QoS::AtLeastOnce);
        s.pkid = pkid;
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        self.send(&b).await;
        loop {
            match self.next_v4().await {
                Some(v4::Packet::SubAck(a)) if a.pkid == pkid => return a.return_codes,
                Some(_) => continue,
                None => panic!("closed before SUBACK"),
            }
        }
    }

    pub async fn publish_v4(&mut self, topic: &str, payload: &[u8], qos: rumqttc::QoS, pkid: u16) {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        self.send(&b).await;
    }
}

/// A connected MQTT 3.1.1 device.
pub async fn device_v4(srv: &TestServer, pk: &str, dn: &str, secret: &str) -> Raw {
    let (cid, u, p) = creds(pk, dn, secret, SignMethod::HmacSha256, false);
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c.connect_v4(&cid, &u, &p, 60).await,
        v4::ConnectReturnCode::Success
    );
    c
}

/// A fresh PostgreSQL database for one test, dropped with it; None (the test is skipped)
/// when IRONLINK_TEST_POSTGRES_URL is not set, which CI (CI=true) does not allow.
pub struct PgDb {
    pub url: String,
    admin: sqlx::PgConnection,
    name: String,
}

pub async fn postgres_database(prefix: &str) -> Option<PgDb> {
    use sqlx::Connection;
    let Ok(admin) = std::env::var("IRONLINK_TEST_POSTGRES_URL") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must set IRONLINK_TEST_POSTGRES_URL"
        );
        eprintln!("IRONLINK_TEST_POSTGRES_URL not set: skipped");
        return None;
    };
    let name = format!(
        "{prefix}_{}",
        ironlink_cloud::registry::new_secret().to_lowercase()
    );
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    Some(PgDb {
        url,
        admin: conn,
        name,
    })
}

impl PgDb {
    /// Drops the database (connections to it are ended).
    pub async fn drop_db(mut self) {
        let _ = sqlx::Executor::execute(
            &mut self.admin,
            format!("DROP DATABASE {} WITH (FORCE)", self.name).as_str(),
        )
        .await;
    }
}
