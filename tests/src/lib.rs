//! End-to-end tests across processes live in `tests/`; the process and device helpers they
//! use come from `ironlink-sim`, which the simulator and benchmarks share.

pub use ironlink_sim::cloud_process::*;
pub use ironlink_sim::edge_process::{gateway, sub_product};

/// Starts an edge gateway in this process from its configuration (TOML) and waits (bounded)
/// until its uplink is up.
pub async fn start_edge(config: &str) -> Result<ironlink_edge::run::Running, String> {
    let config =
        ironlink_edge::config::Config::parse("edge.toml", config).map_err(|e| e.to_string())?;
    let edge = ironlink_edge::run::start(config).map_err(|e| e.to_string())?;
    let mut up = edge.uplink.clone();
    tokio::time::timeout(
        WAIT,
        up.wait_for(|s| *s == ironlink_edge::uplink::State::Up),
    )
    .await
    .map_err(|_| "the edge's uplink did not come up".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(edge)
}

/// GETs `path` from the cloud's API until `done` holds for the answer (bounded by [`WAIT`]);
/// returns that answer. The test fails with `what` and the last answer otherwise.
#[allow(clippy::expect_used)] // test support: an API that does not answer fails the test
pub async fn get_until(
    cloud: &Cloud,
    path: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, v) = cloud
            .api(reqwest::Method::GET, path, None)
            .await
            .expect("the cloud's API answers");
        if done(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The ed25519 signature (hex) of `image` with `key`, as `ironlink-cloud ota sign` makes it.
#[allow(clippy::expect_used)] // test support: reading from memory cannot fail
pub fn sign_image(key: &ed25519_dalek::SigningKey, image: &[u8]) -> String {
    ironlink_cloud::ota::sign::sign_reader(key, &mut &image[..])
        .expect("signing an image in memory")
        .ed25519
}

/// Uploads `image` as version `version` of product `pk` with its ed25519 signature (hex);
/// returns the package id.
#[allow(clippy::expect_used)] // test support: a refused upload fails the test
pub async fn upload_package(
    cloud: &Cloud,
    pk: &str,
    version: &str,
    image: &[u8],
    ed25519: &str,
) -> String {
    let r = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/ota/packages?product_key={pk}&version={version}&ed25519={ed25519}",
            cloud.http
        ))
        .bearer_auth(&cloud.token)
        .body(image.to_vec())
        .send()
        .await
        .expect("the cloud's API answers");
    assert_eq!(r.status().as_u16(), 201, "the package upload");
    let v: serde_json::Value = r.json().await.expect("a JSON answer");
    v["id"].as_str().expect("the package's id").to_owned()
}
