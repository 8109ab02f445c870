//! AMQP 1.0 over TLS for applications, compatible with Alibaba's server-side subscription:
//! SASL PLAIN with the `authMode=aksign` username and an HMAC password, one receiver link per
//! connection (required within 15 s), messages with the `topic`, `messageId` and
//! `generateTime` application properties and the payload as the body. A message is settled
//! only when the client accepts it; anything else goes back to the group.

use super::{AppMessage, Apps};
use crate::access::Shared;
use base64::Engine as _;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslAcceptor, SessionAcceptor,
};
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErr};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Message, Outcome};
use fe2o3_amqp::types::primitives::{Array, Binary, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hmac::{Hmac, Mac};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// Deliveries a connection keeps unsettled at once.
const WINDOW: usize = 128;

/// What the username says (`{clientId}|authMode=aksign,signMethod=...,timestamp=...,
/// authId=...,consumerGroupId=...|`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The application's client id.
    pub client_id: String,
    /// Access key id (`authId`).
    pub access_key_id: String,
    /// Consumer group.
    pub group_id: String,
    /// `hmacmd5`, `hmacsha1` or `hmacsha256`.
    pub sign_method: String,
    /// ms, as signed.
    pub timestamp: String,
}

/// Parses the username; the error says what is missing.
pub fn parse_username(username: &str) -> Result<Login, String> {
    let (client_id, rest) = username
        .split_once('|')
        .ok_or("username must be `{clientId}|authMode=aksign,...|`")?;
    let params = rest.trim_end_matches('|');
    let get = |k: &str| {
        params
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_owned())
    };
    if get("authMode").as_deref() != Some("aksign") {
        return Err("authMode must be aksign".into());
    }
    let need = |k: &str| {
        get(k)
            .filter(|v| !v.is_empty())
            .ok_or(format!("`{k}` is missing from the username"))
    };
    Ok(Login {
        client_id: client_id.to_owned(),
        access_key_id: need("authId")?,
        group_id: need("consumerGroupId")?,
        sign_method: get("signMethod").unwrap_or_else(|| "hmacsha1".into()),
        timestamp: need("timestamp")?,
    })
}

/// The password a client must send: base64 of HMAC(secret, `authId={id}&timestamp={ts}`).
pub fn password(
    method: &str,
    secret: &str,
    access_key_id: &str,
    timestamp: &str,
) -> Option<String> {
    let content = format!("authId={access_key_id}&timestamp={timestamp}");
    let mac = match method.to_ascii_lowercase().as_str() {
        "hmacsha1" => {
            let mut m = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).ok()?;
            m.update(content.as_bytes());
            m.finalize().into_bytes().to_vec()
        }
        "hmacsha256" => {
            let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).ok()?;
            m.update(content.as_bytes());
            m.finalize().into_bytes().to_vec()
        }
        "hmacmd5" => {
            let mut m = Hmac::<md5::Md5>::new_from_slice(secret.as_bytes()).ok()?;
            m.update(content.as_bytes());
            m.finalize().into_bytes().to_vec()
        }
        _ => return None,
    };
    Some(base64::engine::general_purpose::STANDARD.encode(mac))
}

/// Checks a PLAIN login against the access keys and groups.
pub fn authenticate(
    apps: &Apps,
    username: &str,
    pass: &str,
    window: Option<std::time::Duration>,
) -> Result<Login, String> {
    let login = parse_username(username)?;
    let secret = apps
        .secret(&login.access_key_id)
        .ok_or_else(|| format!("access key `{}` does not exist", login.access_key_id))?;
    let expected = password(
        &login.sign_method,
        &secret,
        &login.access_key_id,
        &login.timestamp,
    )
    .ok_or_else(|| {
        format!(
            "signMethod `{}` is not hmacmd5, hmacsha1 or hmacsha256",
            login.sign_method
        )
    })?;
    if !ironlink_shared::sign::constant_eq(expected.as_bytes(), pass.as_bytes()) {
        return Err("password does not match the signature of authId and timestamp".into());
    }
    // A captured login is good only within the window of its signed time.
    if let Some(window) = window {
        ironlink_shared::credentials::check_timestamp(
            Some(&login.timestamp),
            window,
            crate::registry::now_ms(),
        )
        .map_err(|e| format!("{e} (window {window:?})"))?;
    }
    if !apps.group_exists(&login.group_id) {
        return Err(format!(
            "consumer group `{}` does not exist",
            login.group_id
        ));
    }
    Ok(login)
}

/// SASL PLAIN that records who logged in (one instance per connection).
#[derive(Clone)]
struct Plain {
    apps: Arc<Apps>,
    window: Option<std::time::Duration>,
    outcome: Arc<Mutex<Option<Result<Login, String>>>>,
}

impl Plain {
    fn decide(&self, response: Option<&[u8]>) -> SaslServerFrame {
        let result = match response {
            None => Err("PLAIN needs an initial response".to_owned()),
            Some(r) => {
                let mut parts = r.split(|b| *b == 0);
                let _authzid = parts.next();
                match (parts.next(), parts.next()) {
                    (Some(u), Some(p)) => match (std::str::from_utf8(u), std::str::from_utf8(p)) {
                        (Ok(u), Ok(p)) => authenticate(&self.apps, u, p, self.window),
                        _ => Err("username and password must be UTF-8".into()),
                    },
                    _ => Err("malformed PLAIN response".into()),
                }
            }
        };
        let (code, data) = match &result {
            Ok(_) => (SaslCode::Ok, None),
            Err(why) => (SaslCode::Auth, Some(Binary::from(why.as_bytes().to_vec()))),
        };
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: data,
        })
    }
}

impl SaslAcceptor for Plain {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        if init.mechanism.as_str() != "PLAIN" {
            return self.decide(None);
        }
        let r = init.initial_response.map(|b| b.into_vec());
        self.decide(r.as_deref())
    }

    fn on_response(&mut self, response: SaslResponse) -> SaslServerFrame {
        let r = response.response.into_vec();
        self.decide(Some(&r))
    }
}

/// Accepts AMQPS connections until `shutdown`.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "AMQP accept failed");
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let shared = shared.clone();
        let tls = tls.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            serve(shared, tcp, tls, peer, stop).await;
        });
    }
}

fn to_amqp(m: &AppMessage) -> Message<Data> {
    Message::builder()
        .application_properties(
            ApplicationProperties::builder()
                .insert("topic", m.topic.clone())
                .insert("messageId", m.message_id.clone())
                .insert("generateTime", m.generated_at)
                .build(),
        )
        .data(Binary::from(m.payload.to_vec()))
        .build()
}

async fn serve(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    tls: TlsAcceptor,
    peer: std::net::SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + shared.config.apps.amqp_link_timeout;
    let Ok(Ok(stream)) = tokio::time::timeout_at(deadline, tls.accept(tcp)).await else {
        tracing::info!(%peer, "AMQP: TLS handshake failed or timed out");
        return;
    };
    let plain = Plain {
        apps: shared.apps.clone(),
        window: shared.config.apps.timestamp_window,
        outcome: Arc::default(),
    };
    let acceptor = ConnectionAcceptor::builder()
        .container_id("ironlink")
        .idle_time_out(60_000u32)
        .sasl_acceptor(plain.clone())
        .build();
    let mut conn = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(c)) => c,
        other => {
            let why = plain
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match why {
                Some(Err(why)) => tracing::warn!(%peer, %why, "AMQP login refused"),
                _ => {
                    tracing::info!(%peer, result = ?other.map(|r| r.err()), "AMQP connection not opened")
                }
            }
            return;
        }
    };
    let outcome = plain
        .outcome
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let login = match outcome {
        Some(Ok(l)) => l,
        _ => {
            let _ = conn.close().await;
            return;
        }
    };
    let refuse =
        |condition: AmqpError, why: &str| AmqpErr::new(condition, Some(why.to_owned()), None);
    let mut session =
        match tokio::time::timeout_at(deadline, SessionAcceptor::new().accept(&mut conn)).await {
            Ok(Ok(s)) => s,
            _ => {
                let _ = conn
                    .close_with_error(refuse(
                        AmqpError::NotAllowed,
                        "no session and receiver link in time (apps.amqp_link_timeout)",
                    ))
                    .await;
                return;
            }
        };
    let links = LinkAcceptor::new();
    let mut sender = match tokio::time::timeout_at(deadline, links.accept(&mut session)).await {
        Ok(Ok(LinkEndpoint::Sender(s))) => s,
        Ok(Ok(LinkEndpoint::Receiver(r))) => {
            let _ = r
                .close_with_error(refuse(
                    AmqpError::NotAllowed,
                    "applications receive only: open a receiver link",
                ))
                .await;
            let _ = conn
                .close_with_error(refuse(
                    AmqpError::NotAllowed,
                    "applications receive only: open a receiver link",
                ))
                .await;
            return;
        }
        _ => {
            let _ = conn
                .close_with_error(refuse(
                    AmqpError::NotAllowed,
                    "no receiver link in time (apps.amqp_link_timeout)",
                ))
                .await;
            return;
        }
    };
    tracing::info!(%peer, client_id = %login.client_id, group = %login.group_id, "AMQP application connected");
    let mut consumer = shared.apps.attach(&login.group_id);
    let mut pending = FuturesUnordered::new();
    let why = loop {
        tokio::select! {
            m = consumer.next(), if pending.len() < WINDOW => {
                let Some(m) = m else { break "group closed".to_owned() };
                match sender.send_batchable(to_amqp(&m)).await {
                    Ok(fut) => pending.push(async move { (m.id, fut.await) }),
                    Err(e) => {
                        let _ = consumer.settle(m.id, false).await;
                        break format!("send failed: {e}");
                    }
                }
            }
            Some((id, outcome)) = pending.next(), if !pending.is_empty() => {
                let accepted = matches!(outcome, Ok(Outcome::Accepted(_)));
                if let Err(e) = consumer.settle(id, accepted).await {
                    tracing::error!(error = %e, "recording an AMQP settlement failed");
                }
            }
            extra = session.next_incoming_attach() => {
                match extra {
                    Some(attach) => {
                        // One receiver link per connection: a second one is refused.
                        if let Ok(link) = links.accept_incoming_attach(attach, &mut session).await {
                            let err = refuse(AmqpError::ResourceLimitExceeded, "one receiver link per connection");
                            match link {
                                LinkEndpoint::Sender(s) => { let _ = s.close_with_error(err).await; }
                                LinkEndpoint::Receiver(r) => { let _ = r.close_with_error(err).await; }
                            }
                        }
                    }
                    None => break "session ended".to_owned(),
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break "server shutting down".to_owned(),
        }
    };
    tracing::info!(%peer, client_id = %login.client_id, group = %login.group_id, %why, "AMQP application disconnected");
    // Unsettled deliveries go back to the group when the consumer is dropped.
    drop(consumer);
    let _ = sender.close().await;
    let _ = conn.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_parse_or_say_what_is_missing() {
        let l = parse_username("app1|authMode=aksign,signMethod=hmacsha256,timestamp=1700000000000,authId=LTAIx,iotInstanceId=,consumerGroupId=G1|").unwrap();
        assert_eq!(
            (
                l.client_id.as_str(),
                l.access_key_id.as_str(),
                l.group_id.as_str(),
                l.sign_method.as_str()
            ),
            ("app1", "LTAIx", "G1", "hmacsha256")
        );
        assert!(parse_username("app1").is_err());
        assert!(
            parse_username("a|authMode=other,authId=x,consumerGroupId=g,timestamp=1|")
                .unwrap_err()
                .contains("aksign")
        );
        assert!(
            parse_username("a|authMode=aksign,timestamp=1,consumerGroupId=g|")
                .unwrap_err()
                .contains("authId")
        );
    }

    #[test]
    fn password_is_base64_hmac_of_auth_id_and_timestamp() {
        // python3: base64.b64encode(hmac.new(b"secret", b"authId=LTAIx&timestamp=1", hashlib.sha1).digest())
        assert_eq!(
            password("hmacsha1", "secret", "LTAIx", "1").unwrap(),
            "jAa+1E43G9uT2uLKfQXRy6SFmHE="
        );
        assert!(password("rot13", "s", "a", "1").is_none());
    }
}
