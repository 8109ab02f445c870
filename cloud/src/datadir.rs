//! The data dir: created readable by its owner only, and locked for as long as one server
//! uses it. A second `serve` on the same dir would record a false "server restart" offline
//! for every device the first one still holds, so it refuses to start instead.

use anyhow::Context;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file in the data dir.
pub const LOCK_FILE: &str = "lock";

/// The data dir's lock; released when dropped (or when the process dies, kill -9 included:
/// the kernel drops the lock with the file descriptor).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` (mode 0700) when it is missing, warns when an existing one is readable by
/// others, then takes its lock, or says which process holds it.
pub fn prepare(dir: &Path) -> anyhow::Result<DataDirLock> {
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    } else {
        warn_if_open(dir);
    }
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_owned()
            } else {
                format!("process {holder}")
            };
            anyhow::bail!(
                "data dir {} is in use by {who} (another `ironlink-cloud serve`): stop it first, or give this one its own --data-dir",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(DataDirLock { _file: file, path })
}

/// Creates the SQLite database file readable by its owner only before SQLite does (its WAL
/// and shared-memory files take the database file's permissions).
pub fn create_private_sqlite(database_url: &str) {
    let Some(rest) = database_url.strip_prefix("sqlite://") else {
        return;
    };
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path.starts_with(':') || Path::new(path).exists() {
        return;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    if let Err(e) = opts.open(path) {
        tracing::warn!(path, error = %e, "could not create the database file readable by its owner only");
    }
}

#[cfg(unix)]
fn warn_if_open(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "the data dir holds secrets and is readable by other users: chmod 700 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_open(_dir: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_and_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = prepare(&dir).unwrap();
        let e = prepare(&dir).unwrap_err().to_string();
        assert!(e.contains("is in use by process"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        prepare(&dir).expect("free again once the first lock is dropped");
    }

    #[cfg(unix)]
    #[test]
    fn the_data_dir_and_database_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let _lock = prepare(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let db = dir.join("ironlink.db");
        create_private_sqlite(&format!("sqlite://{}?mode=rwc", db.display()));
        let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
