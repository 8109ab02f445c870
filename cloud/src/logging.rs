//! Logs on stderr: the filter from `IRONLINK_LOG`, else `RUST_LOG`, else the config file's
//! `log` key, else `info`; text lines (ANSI colours only when stderr is a terminal and
//! `NO_COLOR` is unset) or JSON lines. The filter can be replaced while the server runs
//! (SIGHUP re-reads the config file).

use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Where the filter in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSource {
    /// The filter text.
    pub filter: String,
    /// `IRONLINK_LOG`, `RUST_LOG`, `config` or `default`.
    pub from: &'static str,
}

/// The filter to use: the environment wins over the config file's `log` key.
pub fn choose(config_filter: Option<&str>) -> FilterSource {
    for var in ["IRONLINK_LOG", "RUST_LOG"] {
        if let Ok(v) = std::env::var(var) {
            if !v.trim().is_empty() {
                return FilterSource {
                    filter: v,
                    from: var,
                };
            }
        }
    }
    match config_filter {
        Some(f) if !f.trim().is_empty() => FilterSource {
            filter: f.to_owned(),
            from: "config",
        },
        _ => FilterSource {
            filter: "info".into(),
            from: "default",
        },
    }
}

/// Parses a filter, saying where it came from when it is invalid.
pub fn parse(src: &FilterSource) -> anyhow::Result<EnvFilter> {
    EnvFilter::builder()
        .parse(&src.filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter `{}` (from {}): {e}; use e.g. `info` or `ironlink_cloud::access=debug,info`", src.filter, src.from))
}

/// The installed logger; its filter can be replaced.
#[derive(Debug)]
pub struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter in force.
    pub source: FilterSource,
}

impl Logging {
    /// Replaces the filter; the old one stays on an error.
    pub fn set_filter(&mut self, src: FilterSource) -> anyhow::Result<bool> {
        if src == self.source {
            return Ok(false);
        }
        let f = parse(&src)?;
        self.handle
            .reload(f)
            .map_err(|e| anyhow::anyhow!("replacing the log filter: {e}"))?;
        self.source = src;
        Ok(true)
    }
}

/// True when log lines may carry ANSI colours.
pub fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Installs the global logger.
pub fn init(format: Format, config_filter: Option<&str>) -> anyhow::Result<Logging> {
    let source = choose(config_filter);
    let filter = parse(&source)?;
    let (filter, handle) = reload::Layer::new(filter);
    let out = match format {
        Format::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colours())
            .boxed(),
        Format::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(out)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
    Ok(Logging { handle, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_filter_says_what_and_where() {
        let e = parse(&FilterSource {
            filter: "ironlink=notalevel".into(),
            from: "RUST_LOG",
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ironlink=notalevel") && e.contains("RUST_LOG"),
            "{e}"
        );
        assert!(parse(&FilterSource {
            filter: "ironlink_cloud::access=debug,info".into(),
            from: "config",
        })
        .is_ok());
    }
}
