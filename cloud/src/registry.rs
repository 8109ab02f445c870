//! Products and devices: validation, generated keys and secrets.

use crate::storage::{Db, Device, Product, StorageError};
use rand::distributions::{Alphanumeric, DistString};
use rand::Rng;

/// Registry errors, each with a message that says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Input failed validation.
    #[error("{0}")]
    Invalid(String),
    /// No such product or device.
    #[error("{0}")]
    NotFound(String),
    /// A name is already taken.
    #[error("{0}")]
    Conflict(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Conflict(m) => Self::Conflict(m),
            other => Self::Storage(other),
        }
    }
}

/// Node types of a product.
pub const NODE_TYPES: &[&str] = &["direct", "gateway", "sub-device"];
/// Data formats of a product.
pub const DATA_FORMATS: &[&str] = &["alink-json", "raw"];
/// Most devices one batch request may create.
pub const MAX_BATCH: usize = 1000;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new product key: `a1` and nine alphanumerics, as Alibaba's look.
pub fn new_product_key() -> String {
    format!(
        "a1{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 9)
    )
}

/// A new secret: 32 hex digits (128 random bits).
pub fn new_secret() -> String {
    let bytes: [u8; 16] = rand::thread_rng().gen();
    hex::encode(bytes)
}

/// Checks a device name: 4 to 32 characters of letters, digits and `-_@.:`.
pub fn validate_device_name(name: &str) -> Result<(), RegistryError> {
    if !ironlink_shared::valid_device_name(name) {
        return Err(RegistryError::Invalid(format!(
            "device name `{}` is invalid: use {}",
            name.escape_debug(),
            ironlink_shared::DEVICE_NAME_RULE
        )));
    }
    Ok(())
}

/// What a new product is made of.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1 to 64 characters, not only white space.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    /// `direct` (default), `gateway` or `sub-device`.
    #[serde(default = "default_node_type")]
    #[schema(pattern = "^(direct|gateway|sub-device)$")]
    pub node_type: String,
    /// `alink-json` (default) or `raw`.
    #[serde(default = "default_data_format")]
    #[schema(pattern = "^(alink-json|raw)$")]
    pub data_format: String,
    /// Allow dynamic registration with the product secret.
    #[serde(default)]
    pub dynamic_register: bool,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Owner; gateways only carry sub-devices of their own tenant. Default `default`.
    #[serde(default = "default_tenant")]
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub tenant: String,
}

fn default_tenant() -> String {
    "default".into()
}

fn default_node_type() -> String {
    "direct".into()
}

fn default_data_format() -> String {
    "alink-json".into()
}

/// Checks a display name (product, tenant, consumer group, rule): `min` to `max` characters
/// once trimmed, no control characters (they garble logs, terminals and CSV exports).
pub fn check_label(what: &str, name: &str, max: usize) -> Result<(), String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > max {
        return Err(format!("{what} must be 1 to {max} characters"));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{what} holds the control character {:?}: use printable characters",
            c
        ));
    }
    Ok(())
}

/// Creates a product with a generated key and secret.
pub async fn create_product(db: &Db, p: NewProduct) -> Result<Product, RegistryError> {
    let name = p.name.trim();
    check_label("product name", name, 64).map_err(RegistryError::Invalid)?;
    if !NODE_TYPES.contains(&p.node_type.as_str()) {
        return Err(RegistryError::Invalid(format!(
            "node_type `{}` is invalid: use one of {}",
            p.node_type,
            NODE_TYPES.join(", ")
        )));
    }
    if p.tenant.is_empty() {
        return Err(RegistryError::Invalid(
            "tenant must be 1 to 64 characters".into(),
        ));
    }
    check_label("tenant", &p.tenant, 64).map_err(RegistryError::Invalid)?;
    if !DATA_FORMATS.contains(&p.data_format.as_str()) {
        return Err(RegistryError::Invalid(format!(
            "data_format `{}` is invalid: use one of {}",
            p.data_format,
            DATA_FORMATS.join(", ")
        )));
    }
    let product = Product {
        product_key: new_product_key(),
        name: name.to_owned(),
        node_type: p.node_type,
        data_format: p.data_format,
        product_secret: new_secret(),
        dynamic_register: i64::from(p.dynamic_register),
        description: p.description,
        created_at: now_ms(),
        tenant: p.tenant,
    };
    db.insert_product(&product).await?;
    Ok(product)
}

/// Creates devices: the given names, plus `generate` more with generated names. All or none.
pub async fn create_devices(
    db: &Db,
    pk: &str,
    names: Vec<String>,
    generate: usize,
) -> Result<Vec<Device>, RegistryError> {
    if db.get_product(pk).await?.is_none() {
        return Err(RegistryError::NotFound(format!(
            "product `{pk}` does not exist: list products with GET /api/v1/products"
        )));
    }
    if names.len() + generate > MAX_BATCH {
        return Err(RegistryError::Invalid(format!(
            "at most {MAX_BATCH} devices per request"
        )));
    }
    if names.is_empty() && generate == 0 {
        return Err(RegistryError::Invalid(
            "nothing to create: give device_name, device_names or count".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for n in &names {
        validate_device_name(n)?;
        if !seen.insert(n.as_str()) {
            return Err(RegistryError::Invalid(format!(
                "device name `{n}` appears twice in the request"
            )));
        }
    }
    let now = now_ms();
    let mut all: Vec<String> = names;
    all.extend((0..generate).map(|_| Alphanumeric.sample_string(&mut rand::thread_rng(), 20)));
    let devices: Vec<Device> = all
        .into_iter()
        .map(|device_name| Device {
            product_key: pk.to_owned(),
            device_name,
            device_secret: new_secret(),
            enabled: 1,
            status: "unactive".into(),
            created_at: now,
            first_online_at: None,
            last_online_at: None,
            last_offline_at: None,
            client_addr: None,
            tags: "{}".into(),
        })
        .collect();
    db.insert_devices(&devices).await?;
    Ok(devices)
}
