//! Device lifecycle messages, Alibaba's `/{pk}/{dn}/thing/lifecycle`: a device was created,
//! deleted, enabled or disabled. They go to the consumer groups bound to the product's
//! `lifecycle` messages (and so to the rules that read them) and to the router's MQTT
//! subscribers. Online/offline changes are `status` messages, see [`crate::presence`].

use crate::apps::{Apps, MessageType, Notices};
use crate::router::Router;
use serde_json::json;

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Created through the API or registered by a gateway.
    Create,
    /// Deleted.
    Delete,
    /// Enabled again.
    Enable,
    /// Disabled.
    Disable,
}

impl Action {
    /// Alibaba's `action` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Delete => "delete",
            Action::Enable => "enable",
            Action::Disable => "disable",
        }
    }
}

/// One change of one device.
#[derive(Debug, Clone)]
pub struct Change {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// What happened.
    pub action: Action,
    /// The new device's secret; Alibaba sends it with `create` only.
    pub device_secret: Option<String>,
}

impl Change {
    /// A change without a secret (delete, enable, disable).
    pub fn new(pk: &str, dn: &str, action: Action) -> Self {
        Self {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            action,
            device_secret: None,
        }
    }

    /// A new device, with the secret Alibaba's `create` message carries.
    pub fn created(d: &crate::storage::Device) -> Self {
        Self {
            device_secret: Some(d.device_secret.clone()),
            ..Self::new(&d.product_key, &d.device_name, Action::Create)
        }
    }
}

/// The topic of a device's lifecycle messages.
pub fn topic(pk: &str, dn: &str) -> String {
    format!("/{pk}/{dn}/thing/lifecycle")
}

/// Alibaba's message body for one change, stamped `at` (ms since the Unix epoch).
pub fn body(c: &Change, at: i64) -> String {
    let mut v = json!({
        "action": c.action.as_str(),
        "iotId": format!("{}.{}", c.product_key, c.device_name),
        "productKey": c.product_key,
        "deviceName": c.device_name,
        "messageCreateTime": at,
    });
    if let (Some(secret), Some(o)) = (&c.device_secret, v.as_object_mut()) {
        o.insert("deviceSecret".into(), json!(secret));
    }
    v.to_string()
}

/// Publishes the changes; waits until the consumer groups that take them have committed
/// them. False when they could not be queued (the change itself stands; this is logged).
pub async fn announce(apps: &Apps, router: &Router, changes: Vec<Change>, at: i64) -> bool {
    let mut notices = Notices::new(apps, router);
    for c in &changes {
        let topic = topic(&c.product_key, &c.device_name);
        notices.push(
            &c.product_key,
            MessageType::Lifecycle,
            topic,
            body(c, at),
            at,
        );
    }
    if notices.commit().await {
        return true;
    }
    tracing::error!(
        changes = changes.len(),
        "device lifecycle messages for consumer groups could not be queued"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_follows_alibaba_and_carries_the_secret_on_create_only() {
        let mut c = Change {
            product_key: "a1pk".into(),
            device_name: "d1".into(),
            action: Action::Create,
            device_secret: Some("s3cret".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&body(&c, 42)).unwrap();
        assert_eq!(v["action"], "create");
        assert_eq!(v["iotId"], "a1pk.d1");
        assert_eq!(v["deviceSecret"], "s3cret");
        assert_eq!(v["messageCreateTime"], 42);
        c.action = Action::Disable;
        c.device_secret = None;
        let v: serde_json::Value = serde_json::from_str(&body(&c, 43)).unwrap();
        assert_eq!(v["action"], "disable");
        assert!(v.get("deviceSecret").is_none());
        assert_eq!(topic("a1pk", "d1"), "/a1pk/d1/thing/lifecycle");
    }
}
