//! Gateways and sub-devices: topology (`thing/topo/add|delete|get`), sub-device registration
//! (`thing/sub/register`) and sub-device sessions over the gateway's connection
//! (`combine/login|batch_login|logout|batch_logout`).
//!
//! Handlers check and answer; the connection applies the resulting [`Change`] in order, so the
//! gateway's ACL grows to exactly its logged-in sub-devices' topics.

use super::store::TopoRow;
use super::{code, reply, to_device, Origin, Outcome, Request, Thing};
use crate::access::sessions::Registration;
use crate::registry::now_ms;
use crate::storage::{Device, Product};
use ironlink_shared::alink::Uplink;
use ironlink_shared::sign::{sign_connect, SignMethod};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A logged-in sub-device, as its gateway's connection holds it.
#[derive(Debug)]
pub struct SubEntry {
    /// Serial of its registration in the session registry.
    pub serial: u64,
    /// Dropped when the sub-device's session is over.
    pub done: watch::Sender<()>,
}

/// A connection's logged-in sub-devices.
#[derive(Debug, Clone, Default)]
pub struct Subs(Arc<Mutex<HashMap<(String, String), SubEntry>>>);

impl Subs {
    /// The map, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), SubEntry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `pk/dn` is logged in here.
    pub fn contains(&self, pk: &str, dn: &str) -> bool {
        self.lock().contains_key(&(pk.to_owned(), dn.to_owned()))
    }
}

/// One sub-device login to apply.
#[derive(Debug)]
pub struct SubLogin {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Its entry in the session registry.
    pub registration: Registration,
    /// Subscribe the gateway to the sub-device's downlink topics (client id with `_ss=1`).
    pub auto_subscribe: bool,
}

/// A change to a gateway connection's sub-devices.
#[derive(Debug)]
pub enum Change {
    /// Sub-devices logged in.
    Login(Vec<SubLogin>),
    /// Sub-devices logged out, and why.
    Logout(Vec<(String, String)>, String),
}

type Refusal = (i64, String);

fn field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| v.get(*n).and_then(Value::as_str))
}

fn id_of(v: &Value, path: &str) -> Result<(String, String), Refusal> {
    match (field(v, &["productKey"]), field(v, &["deviceName"])) {
        (Some(pk), Some(dn)) if !pk.is_empty() && !dn.is_empty() => {
            Ok((pk.to_owned(), dn.to_owned()))
        }
        _ => Err((
            code::INVALID_PARAMS,
            format!("{path}: productKey and deviceName are required"),
        )),
    }
}

/// The (product key, device name) of each item, `{prefix}[i]` naming the first without one.
fn ids<'a>(
    items: impl IntoIterator<Item = &'a Value>,
    prefix: &str,
) -> Result<Vec<(String, String)>, Refusal> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| id_of(item, &format!("{prefix}[{i}]")))
        .collect()
}

fn list<'a>(params: &'a Value, max: usize, what: &str) -> Result<&'a Vec<Value>, Refusal> {
    match params.as_array() {
        Some(a) if !a.is_empty() && a.len() <= max => Ok(a),
        Some(a) if a.len() > max => Err((
            code::INVALID_PARAMS,
            format!("at most {max} {what} per request"),
        )),
        _ => Err((
            code::INVALID_PARAMS,
            format!("params must be a non-empty list of {what}"),
        )),
    }
}

/// What one request about many sub-devices needs from the registry, read in a few queries
/// (per product: its row, its devices by name, their gateways) rather than three per
/// sub-device.
#[derive(Debug, Default)]
struct Known {
    products: HashMap<String, Option<Product>>,
    devices: HashMap<(String, String), Device>,
    gateways: HashMap<(String, String), TopoRow>,
}

impl Known {
    async fn load(thing: &Thing, ids: &[(String, String)]) -> Result<Self, Refusal> {
        let internal = |e: crate::storage::StorageError| (code::INTERNAL, format!("storage: {e}"));
        let mut by_product: HashMap<&str, Vec<&str>> = HashMap::new();
        for (pk, dn) in ids {
            by_product.entry(pk).or_default().push(dn);
        }
        let mut k = Known::default();
        for (pk, names) in by_product {
            let product = thing.db.get_product(pk).await.map_err(internal)?;
            k.products.insert(pk.to_owned(), product);
            for (dn, d) in thing.db.devices_named(pk, &names).await.map_err(internal)? {
                k.devices.insert((pk.to_owned(), dn), d);
            }
            for (dn, t) in thing
                .db
                .gateways_of_named(pk, &names)
                .await
                .map_err(internal)?
            {
                k.gateways.insert((pk.to_owned(), dn), t);
            }
        }
        Ok(k)
    }

    fn product(&self, pk: &str) -> Option<&Product> {
        self.products.get(pk).and_then(Option::as_ref)
    }

    fn device(&self, pk: &str, dn: &str) -> Option<&Device> {
        self.devices.get(&(pk.to_owned(), dn.to_owned()))
    }

    /// The gateway `pk/dn` belongs to, as (product key, device name).
    fn gateway_of(&self, pk: &str, dn: &str) -> Option<(&str, &str)> {
        self.gateways.get(&(pk.to_owned(), dn.to_owned())).map(|t| {
            (
                t.gateway_product_key.as_str(),
                t.gateway_device_name.as_str(),
            )
        })
    }
}

/// Checks a known sub-device and its product: exists, enabled, a sub-device product of the
/// gateway's tenant.
fn sub_device<'k>(
    known: &'k Known,
    gw: &Product,
    pk: &str,
    dn: &str,
    path: &str,
) -> Result<&'k Device, Refusal> {
    let Some(product) = known.product(pk) else {
        return Err((
            code::DEVICE_NOT_FOUND,
            format!("{path}: product `{pk}` does not exist"),
        ));
    };
    if product.tenant != gw.tenant {
        return Err((
            code::INVALID_PARAMS,
            format!("{path}: product `{pk}` belongs to another tenant"),
        ));
    }
    if product.node_type != "sub-device" {
        return Err((
            code::INVALID_PARAMS,
            format!(
                "{path}: product `{pk}` is a `{}` product, not a sub-device product",
                product.node_type
            ),
        ));
    }
    let Some(device) = known.device(pk, dn) else {
        return Err((
            code::DEVICE_NOT_FOUND,
            format!("{path}: device `{pk}/{dn}` does not exist"),
        ));
    };
    if device.enabled == 0 {
        return Err((
            code::DEVICE_DISABLED,
            format!("{path}: device `{pk}/{dn}` is disabled"),
        ));
    }
    Ok(device)
}

/// Checks a sub-device signature: HMAC of `clientId{c}deviceName{dn}productKey{pk}timestamp{t}`.
fn check_sign(
    item: &Value,
    method: Option<&str>,
    device: &Device,
    path: &str,
    window: Option<std::time::Duration>,
) -> Result<(), Refusal> {
    let method = field(item, &["signmethod", "signMethod"])
        .or(method)
        .unwrap_or("hmacsha1");
    let Some(method) = SignMethod::parse(method) else {
        return Err((
            code::INVALID_PARAMS,
            format!("{path}: sign method `{method}` is not hmacSha1, hmacSha256 or hmacMd5"),
        ));
    };
    let (Some(client_id), Some(sign)) = (field(item, &["clientId"]), field(item, &["sign"])) else {
        return Err((
            code::INVALID_PARAMS,
            format!("{path}: clientId and sign are required"),
        ));
    };
    let ts = field(item, &["timestamp"]);
    let expected = sign_connect(
        method,
        &device.device_secret,
        client_id,
        &device.device_name,
        &device.product_key,
        ts,
    );
    if expected.matches(sign) {
        // A captured signature replayed later (by another gateway, say) is refused once the
        // timestamp window is on, as the device's own CONNECT is.
        if let Some(window) = window {
            if let Err(e) = ironlink_shared::credentials::check_timestamp(ts, window, now_ms()) {
                return Err((
                    code::INVALID_PARAMS,
                    format!(
                        "{path}: `{}/{}`: {e} (window {window:?})",
                        device.product_key, device.device_name
                    ),
                ));
            }
        }
        Ok(())
    } else {
        Err((
            code::INVALID_PARAMS,
            format!(
                "{path}: signature of `{}/{}` does not match its device secret",
                device.product_key, device.device_name
            ),
        ))
    }
}

/// Handles a gateway request on the gateway's own topics.
pub async fn handle(
    thing: &Arc<Thing>,
    origin: &Origin,
    kind: Uplink<'_>,
    req: Request,
    reply_topic: String,
) -> Outcome {
    let gw = (origin.product_key.as_str(), origin.device_name.as_str());
    let method = match kind {
        Uplink::TopoAdd => "thing.topo.add",
        Uplink::TopoDelete => "thing.topo.delete",
        Uplink::TopoGet => "thing.topo.get",
        Uplink::SubRegister => "thing.sub.register",
        Uplink::Login => "combine.login",
        Uplink::BatchLogin => "combine.batch_login",
        Uplink::Logout => "combine.logout",
        _ => "combine.batch_logout",
    };
    let r = match thing.db.get_product(gw.0).await {
        Ok(Some(p)) if p.node_type == "gateway" => run(thing, origin, &p, kind, &req).await,
        Ok(Some(p)) => Err((
            code::INVALID_PARAMS,
            format!(
                "`{}/{}` is a device of a `{}` product: only gateway products have sub-devices",
                gw.0, gw.1, p.node_type
            ),
        )),
        Ok(None) => Err((
            code::DEVICE_NOT_FOUND,
            format!("product `{}` no longer exists", gw.0),
        )),
        Err(e) => Err((code::INTERNAL, format!("storage: {e}"))),
    };
    let (code, message, data, change) = match r {
        Ok((data, change)) => (code::OK, "success".to_owned(), data, change),
        Err((code, message)) => {
            tracing::info!(gateway = %format!("{}/{}", gw.0, gw.1), method, code, %message, "gateway request refused");
            (code, message, json!({}), None)
        }
    };
    // Logins and logouts are always answered: the gateway must know which sub-devices are on.
    let mut out = if req.ack
        || matches!(
            kind,
            Uplink::Login | Uplink::BatchLogin | Uplink::Logout | Uplink::BatchLogout
        ) {
        Outcome::reply(to_device(
            reply_topic,
            reply(&req.id, code, &message, data, Some(method)),
        ))
    } else {
        Outcome::default()
    };
    out.failed = code == code::INTERNAL;
    out.change = change;
    out
}

async fn run(
    thing: &Arc<Thing>,
    origin: &Origin,
    gw: &Product,
    kind: Uplink<'_>,
    req: &Request,
) -> Result<(Value, Option<Change>), Refusal> {
    let gwid = (origin.product_key.as_str(), origin.device_name.as_str());
    let max = thing.config.thing.max_batch;
    let internal = |e: crate::storage::StorageError| (code::INTERNAL, format!("storage: {e}"));
    match kind {
        Uplink::TopoAdd => {
            let items = list(&req.params, max, "sub-devices")?;
            let ids = ids(items, "params")?;
            let known = Known::load(thing, &ids).await?;
            let mut subs = Vec::with_capacity(items.len());
            for (i, (item, (pk, dn))) in items.iter().zip(ids).enumerate() {
                let path = format!("params[{i}]");
                if (pk.as_str(), dn.as_str()) == gwid {
                    return Err((
                        code::INVALID_PARAMS,
                        format!("{path}: a gateway cannot be its own sub-device"),
                    ));
                }
                let device = sub_device(&known, gw, &pk, &dn, &path)?;
                check_sign(
                    item,
                    None,
                    device,
                    &path,
                    thing.config.mqtt.timestamp_window,
                )?;
                // A sub-device moves between gateways only once its gateway let it go: a
                // second gateway holding its signature must not take it over.
                if let Some(owner) = known.gateway_of(&pk, &dn) {
                    if owner != gwid {
                        return Err((
                            code::INVALID_PARAMS,
                            format!(
                                "{path}: `{pk}/{dn}` is a sub-device of gateway `{}/{}`: that gateway must remove it first (topo/delete), or an operator (DELETE /api/v1/devices/{}/{}/sub-devices/{pk}/{dn})",
                                owner.0, owner.1, owner.0, owner.1
                            ),
                        ));
                    }
                }
                subs.push((pk, dn));
            }
            thing
                .db
                .add_topology(gwid, &subs, now_ms())
                .await
                .map_err(internal)?;
            topology_message(thing, gwid, "add", &subs).await;
            Ok((ids_json(&subs), None))
        }
        Uplink::TopoDelete => {
            let subs = ids(list(&req.params, max, "sub-devices")?, "params")?;
            let known = Known::load(thing, &subs).await?;
            for (pk, dn) in &subs {
                match known.gateway_of(pk, dn) {
                    Some(owner) if owner == gwid => {}
                    _ => {
                        return Err((
                            code::TOPO_NOT_FOUND,
                            format!("`{pk}/{dn}` is not a sub-device of this gateway"),
                        ))
                    }
                }
            }
            let removed = thing
                .db
                .delete_topology(gwid, &subs)
                .await
                .map_err(internal)?;
            topology_message(thing, gwid, "remove", &removed).await;
            let online: Vec<(String, String)> = removed
                .iter()
                .filter(|(pk, dn)| origin.subs.contains(pk, dn))
                .cloned()
                .collect();
            let data = ids_json(&removed);
            let change = (!online.is_empty())
                .then(|| Change::Logout(online, "removed from the gateway's topology".into()));
            Ok((data, change))
        }
        Uplink::TopoGet => {
            let rows = thing
                .db
                .topology_of(gwid.0, gwid.1)
                .await
                .map_err(internal)?;
            let ids: Vec<(String, String)> = rows
                .into_iter()
                .map(|t| (t.product_key, t.device_name))
                .collect();
            Ok((ids_json(&ids), None))
        }
        Uplink::SubRegister => {
            let items = list(&req.params, max, "sub-devices")?;
            let ids = ids(items, "params")?;
            let mut known = Known::load(thing, &ids).await?;
            // Checked first, then the new devices created per product in one statement.
            let mut missing: HashMap<String, Vec<String>> = HashMap::new();
            for (i, (pk, dn)) in ids.iter().enumerate() {
                let path = format!("params[{i}]");
                let Some(product) = known.product(pk) else {
                    return Err((
                        code::DEVICE_NOT_FOUND,
                        format!("{path}: product `{pk}` does not exist"),
                    ));
                };
                if product.tenant != gw.tenant
                    || product.node_type != "sub-device"
                    || product.dynamic_register == 0
                {
                    return Err((code::INVALID_PARAMS, format!("{path}: product `{pk}` does not allow sub-device registration by this gateway (it must be a sub-device product of the same tenant with dynamic registration on)")));
                }
                if known.device(pk, dn).is_some() {
                    if known.gateway_of(pk, dn).is_some_and(|owner| owner != gwid) {
                        return Err((
                            code::INVALID_PARAMS,
                            format!("{path}: `{pk}/{dn}` already belongs to another gateway"),
                        ));
                    }
                } else {
                    crate::registry::validate_device_name(dn)
                        .map_err(|e| (code::INVALID_PARAMS, format!("{path}: {e}")))?;
                    missing.entry(pk.clone()).or_default().push(dn.clone());
                }
            }
            let mut created = Vec::new();
            for (pk, names) in missing {
                let devices = crate::registry::create_devices(&thing.db, &pk, names, 0)
                    .await
                    .map_err(|e| (code::INVALID_PARAMS, format!("params: {e}")))?;
                for d in devices {
                    created.push(crate::lifecycle::Change::created(&d));
                    known.devices.insert((pk.clone(), d.device_name.clone()), d);
                }
            }
            let mut out = Vec::with_capacity(ids.len());
            for (pk, dn) in &ids {
                let Some(device) = known.device(pk, dn) else {
                    return Err((code::INTERNAL, format!("`{pk}/{dn}` was not created")));
                };
                out.push(json!({"productKey": pk, "deviceName": dn, "deviceSecret": device.device_secret, "iotId": format!("{pk}.{dn}")}));
            }
            crate::lifecycle::announce(
                &thing.apps,
                &thing.router,
                created,
                crate::registry::now_ms(),
            )
            .await;
            Ok((Value::Array(out), None))
        }
        Uplink::Login | Uplink::BatchLogin => {
            let (items, method): (Vec<&Value>, Option<&str>) = if kind == Uplink::Login {
                match &req.params {
                    v @ Value::Object(_) => (vec![v], None),
                    _ => return Err((code::INVALID_PARAMS, "params must be an object".into())),
                }
            } else {
                let list = req.params.get("deviceList").map_or(&req.params, |l| l);
                (
                    list_items(list, max)?,
                    field(&req.params, &["signMethod", "signmethod"]),
                )
            };
            let ids = ids(items.iter().copied(), "params.deviceList")?;
            let known = Known::load(thing, &ids).await?;
            let mut fresh = Vec::new();
            let mut all = Vec::new();
            for (i, (item, (pk, dn))) in items.iter().zip(ids).enumerate() {
                let path = format!("params.deviceList[{i}]");
                let device = sub_device(&known, gw, &pk, &dn, &path)?;
                match known.gateway_of(&pk, &dn) {
                    Some(owner) if owner == gwid => {}
                    _ => return Err((code::TOPO_NOT_FOUND, format!("{path}: `{pk}/{dn}` is not in this gateway's topology: add it with thing/topo/add first"))),
                }
                check_sign(
                    item,
                    method,
                    device,
                    &path,
                    thing.config.mqtt.timestamp_window,
                )?;
                let auto = field(item, &["clientId"]).is_some_and(|c| c.contains("_ss=1"));
                if !origin.subs.contains(&pk, &dn) {
                    fresh.push((pk.clone(), dn.clone(), auto));
                }
                all.push((pk, dn));
            }
            let limit = thing.config.thing.max_sub_devices;
            if origin.subs.lock().len() + fresh.len() > limit {
                return Err((
                    code::TOO_MANY,
                    format!("a gateway may have at most {limit} sub-devices logged in"),
                ));
            }
            let mut logins = Vec::with_capacity(fresh.len());
            for (pk, dn, auto) in fresh {
                let registration = thing.sessions.register(&pk, &dn).await;
                logins.push(SubLogin {
                    product_key: pk,
                    device_name: dn,
                    registration,
                    auto_subscribe: auto,
                });
            }
            let data = if kind == Uplink::Login {
                id_json(all.first())
            } else {
                ids_json(&all)
            };
            Ok((data, (!logins.is_empty()).then_some(Change::Login(logins))))
        }
        _ => {
            let items: Vec<&Value> = if kind == Uplink::Logout {
                vec![&req.params]
            } else {
                list_items(req.params.get("deviceList").unwrap_or(&req.params), max)?
            };
            let subs = ids(items.iter().copied(), "params")?;
            let data = if kind == Uplink::Logout {
                id_json(subs.first())
            } else {
                ids_json(&subs)
            };
            let on: Vec<(String, String)> = subs
                .into_iter()
                .filter(|(pk, dn)| origin.subs.contains(pk, dn))
                .collect();
            Ok((
                data,
                (!on.is_empty()).then(|| Change::Logout(on, "logout".into())),
            ))
        }
    }
}

/// Tells consumer groups of the gateway's product about a topology change (Alibaba's
/// `/{pk}/{dn}/thing/topo/lifecycle` message).
/// An operator removes a sub-device from its gateway's topology (for a gateway that is gone,
/// say), so another gateway may add it. Logs the sub-device out if it was logged in. False
/// when it was not a sub-device of that gateway.
pub async fn unbind(
    thing: &Thing,
    gw: (&str, &str),
    sub: (&str, &str),
) -> Result<bool, crate::storage::StorageError> {
    let key = [(sub.0.to_owned(), sub.1.to_owned())];
    let removed = thing.db.delete_topology(gw, &key).await?;
    if removed.is_empty() {
        return Ok(false);
    }
    thing.sessions.kick(
        sub.0,
        sub.1,
        crate::access::sessions::Kick::Admin("removed from its gateway's topology".into()),
    );
    topology_message(thing, gw, "remove", &removed).await;
    Ok(true)
}

async fn topology_message(
    thing: &Thing,
    gw: (&str, &str),
    action: &str,
    subs: &[(String, String)],
) {
    if subs.is_empty() {
        return;
    }
    let devices: Vec<Value> = subs
        .iter()
        .map(|(pk, dn)| json!({"productKey": pk, "deviceName": dn, "iotId": format!("{pk}.{dn}")}))
        .collect();
    let body = json!({
        "action": action, "gwIotId": format!("{}.{}", gw.0, gw.1), "gwProductKey": gw.0,
        "gwDeviceName": gw.1, "devices": devices, "messageCreateTime": now_ms(),
    });
    let topic = format!("/{}/{}/thing/topo/lifecycle", gw.0, gw.1);
    if !thing
        .to_apps(
            gw.0,
            crate::apps::MessageType::Topology,
            topic,
            body.to_string().into_bytes(),
        )
        .await
    {
        tracing::error!(gateway = %format!("{}/{}", gw.0, gw.1), "a topology change could not be queued for consumer groups");
    }
}

/// `{"productKey", "deviceName"}`, the form replies name a device in (`{}` for none).
fn id_json(id: Option<&(String, String)>) -> Value {
    id.map_or_else(
        || json!({}),
        |(pk, dn)| json!({"productKey": pk, "deviceName": dn}),
    )
}

/// A list of [`id_json`].
fn ids_json(ids: &[(String, String)]) -> Value {
    Value::Array(ids.iter().map(|id| id_json(Some(id))).collect())
}

fn list_items(v: &Value, max: usize) -> Result<Vec<&Value>, Refusal> {
    Ok(list(v, max, "sub-devices")?.iter().collect())
}
