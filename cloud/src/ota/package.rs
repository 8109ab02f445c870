//! Packages: uploads streamed to disk and digested on the way, signed with the configured key
//! or checked against it, and removed with their image.

use super::{check_name, check_version, sign, NewPackage, Ota, OtaError};
use crate::ota::store::Package;
use crate::registry::now_ms;
use std::collections::HashSet;

impl Ota {
    /// Removes uploads a crash interrupted and images whose package row never committed.
    pub(super) async fn sweep_files(&self) -> Result<(), OtaError> {
        let known: HashSet<String> = self
            .db
            .list_packages(None)
            .await?
            .into_iter()
            .map(|p| format!("{}.bin", p.id))
            .collect();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") || (name.ends_with(".bin") && !known.contains(&name)) {
                tracing::info!(file = %name, "removing an OTA image no package refers to");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Stores an uploaded image: `body` yields its pieces; they go to disk as they arrive,
    /// digested on the way, never held whole. Signs it when no signature came with it and a
    /// signing key is configured; checks a signature that came with it against that key.
    pub async fn upload<S, E>(&self, meta: NewPackage, mut body: S) -> Result<Package, OtaError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let meta = self.check_package(meta).await?;
        let tmp = self.dir.join(format!(
            ".upload-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut digests = sign::Digests::default();
        let mut seen = 0u64;
        let max = self.config.max_package_bytes;
        let outcome: Result<(), OtaError> = async {
            while let Some(piece) = body.next().await {
                let piece =
                    piece.map_err(|e| OtaError::Invalid(format!("reading the upload: {e}")))?;
                digests.update(&piece);
                seen += piece.len() as u64;
                if seen > max {
                    return Err(OtaError::TooLarge(format!(
                        "the image is larger than ota.max_package_bytes ({max} bytes)"
                    )));
                }
                file.write_all(&piece).await?;
            }
            file.sync_all().await?;
            Ok(())
        }
        .await;
        drop(file);
        if let Err(e) = outcome {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let d = digests.finish();
        let done = self.finish_upload(meta, d, &tmp).await;
        if done.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        done
    }

    async fn check_package(&self, mut meta: NewPackage) -> Result<NewPackage, OtaError> {
        if self.db.get_product(&meta.product_key).await?.is_none() {
            return Err(OtaError::NotFound(format!(
                "product `{}` does not exist",
                meta.product_key
            )));
        }
        if meta.module.is_empty() {
            meta.module = "default".into();
        }
        check_name("module", &meta.module).map_err(OtaError::Invalid)?;
        check_version(&meta.version).map_err(OtaError::Invalid)?;
        if meta.src_versions.len() > 100 {
            return Err(OtaError::Invalid(
                "src_versions: at most 100 versions".into(),
            ));
        }
        for v in &meta.src_versions {
            check_version(v).map_err(|e| OtaError::Invalid(format!("src_versions: {e}")))?;
        }
        meta.sign_method = match meta.sign_method.to_ascii_lowercase().as_str() {
            "" | "md5" => "Md5".into(),
            "sha256" => "SHA256".into(),
            _ => {
                return Err(OtaError::Invalid(format!(
                    "sign_method `{}` must be Md5 or SHA256",
                    meta.sign_method
                )))
            }
        };
        if meta.file_name.is_empty() {
            meta.file_name = format!("{}-{}.bin", meta.module, meta.version);
        }
        if meta.file_name.len() > 128
            || meta
                .file_name
                .chars()
                .any(|c| c.is_control() || c == '/' || c == '\\')
        {
            return Err(OtaError::Invalid(
                "file_name must be at most 128 characters, without slashes or control characters"
                    .into(),
            ));
        }
        if meta.description.chars().count() > 1024 {
            return Err(OtaError::Invalid(
                "description must be at most 1024 characters".into(),
            ));
        }
        if let Some(s) = &meta.ed25519 {
            if s.len() != 128 || hex::decode(s).is_err() {
                return Err(OtaError::Invalid(
                    "ed25519 must be 128 hex digits (from `ironlink-cloud ota sign`)".into(),
                ));
            }
        }
        Ok(meta)
    }

    async fn finish_upload(
        &self,
        meta: NewPackage,
        d: sign::Digested,
        tmp: &std::path::Path,
    ) -> Result<Package, OtaError> {
        use ed25519_dalek::Signer;
        if d.size == 0 {
            return Err(OtaError::Invalid("the image is empty".into()));
        }
        let ed25519 = match (&meta.ed25519, &self.signing_key) {
            (Some(given), Some(key)) => {
                if !sign::verify(&key.verifying_key(), &d.sha512, given) {
                    return Err(OtaError::Invalid(
                        "the ed25519 signature does not verify this image with the cloud's signing key (ota.signing_key)".into(),
                    ));
                }
                Some(given.to_ascii_lowercase())
            }
            (Some(given), None) => Some(given.to_ascii_lowercase()),
            (None, Some(key)) => Some(hex::encode(key.sign(&d.sha512).to_bytes())),
            (None, None) => None,
        };
        let p = Package {
            id: format!("pkg-{}", hex::encode(rand::random::<[u8; 6]>())),
            product_key: meta.product_key,
            module: meta.module,
            version: meta.version,
            src_versions: serde_json::to_string(&meta.src_versions).unwrap_or_else(|_| "[]".into()),
            file_name: meta.file_name,
            size: i64::try_from(d.size).unwrap_or(i64::MAX),
            sha256: d.sha256,
            md5: d.md5,
            ed25519,
            sign_method: meta.sign_method,
            description: meta.description,
            created_at: now_ms(),
        };
        let path = self.package_path(&p.id);
        tokio::fs::rename(tmp, &path).await?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        if let Err(e) = self.db.insert_package(&p).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e.into());
        }
        Ok(p)
    }

    /// Deletes a package no campaign uses, with its image.
    pub async fn delete_package(&self, id: &str) -> Result<(), OtaError> {
        if !self.db.delete_package(id).await? {
            return Err(OtaError::NotFound(format!("package `{id}` does not exist")));
        }
        let _ = tokio::fs::remove_file(self.package_path(id)).await;
        Ok(())
    }
}
