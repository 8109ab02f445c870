//! `ironlink-cloud user|key|audit ...`: named users and their roles, API keys, and the audit
//! log (against a running server; managing users needs the admin role).

use super::{output, timeseries::query_string, Client};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

/// `user` actions.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Users and their roles.
    List,
    /// Create a user; the password is read from standard input (one line).
    Create {
        /// 1 to 64 of A-Z a-z 0-9 _ . @ -.
        name: String,
        /// viewer, operator or admin.
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    /// Change a user's role (their keys follow at once).
    SetRole {
        /// User name.
        name: String,
        /// viewer, operator or admin.
        role: String,
    },
    /// Change a user's password, read from standard input (ends their console sessions).
    Password {
        /// User name.
        name: String,
    },
    /// Delete a user and their keys.
    Delete {
        /// User name.
        name: String,
    },
}

/// `key` actions.
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Your keys (an admin: everyone's, or one user's).
    List {
        /// Only this user's (admin).
        #[arg(long)]
        user: Option<String>,
    },
    /// Make a key; its token is printed once.
    Create {
        /// What it is for.
        #[arg(long)]
        label: String,
        /// viewer, operator or admin (default: the user's role).
        #[arg(long)]
        role: Option<String>,
        /// It stops working after this many days (default: never).
        #[arg(long)]
        expires_days: Option<u64>,
        /// Its user (admin; the admin token must name one).
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a key: it stops working at once.
    Revoke {
        /// Key id.
        id: String,
    },
}

fn password_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(!p.is_empty(), "give the password on standard input, e.g. `read -rs P; echo \"$P\" | ironlink-cloud user create ...`");
    Ok(p)
}

/// Runs a `user` action.
pub async fn run_user(c: &Client, cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::List => {
            let v = c.call(Method::GET, "/users", None).await?;
            output(c, &v, Some(("users", &["name", "role", "created_at"])));
        }
        UserCmd::Create { name, role } => {
            let password = password_from_stdin()?;
            let body = json!({"name": name, "role": role, "password": password});
            c.record(Method::POST, "/users", Some(body)).await?;
        }
        UserCmd::SetRole { name, role } => {
            c.call(
                Method::PATCH,
                &format!("/users/{name}"),
                Some(json!({"role": role})),
            )
            .await?;
            output(c, &json!({"name": name, "role": role}), None);
        }
        UserCmd::Password { name } => {
            let password = password_from_stdin()?;
            let body = json!({"password": password});
            c.call(Method::PATCH, &format!("/users/{name}"), Some(body))
                .await?;
            output(c, &json!({"name": name, "password": "changed"}), None);
        }
        UserCmd::Delete { name } => {
            c.call(Method::DELETE, &format!("/users/{name}"), None)
                .await?;
            output(c, &json!({"name": name, "deleted": true}), None);
        }
    }
    Ok(())
}

/// Runs a `key` action.
pub async fn run_key(c: &Client, cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::List { user } => {
            let q = query_string(&[("user", user)]);
            let v = c.call(Method::GET, &format!("/api-keys?{q}"), None).await?;
            let cols: &[&str] = &[
                "id",
                "user",
                "role",
                "label",
                "session",
                "expires_at",
                "revoked_at",
            ];
            output(c, &v, Some(("keys", cols)));
        }
        KeyCmd::Create {
            label,
            role,
            expires_days,
            user,
        } => {
            let mut body = json!({"label": label});
            if let Some(r) = role {
                body["role"] = json!(r);
            }
            if let Some(d) = expires_days {
                body["expires_in_seconds"] = json!(d.saturating_mul(86_400));
            }
            if let Some(u) = user {
                body["user"] = json!(u);
            }
            let v = c.call(Method::POST, "/api-keys", Some(body)).await?;
            let mut shown: Value = v["key"].clone();
            shown["token"] = v["token"].clone();
            output(c, &shown, None);
        }
        KeyCmd::Revoke { id } => {
            c.call(Method::DELETE, &format!("/api-keys/{id}"), None)
                .await?;
            output(c, &json!({"id": id, "revoked": true}), None);
        }
    }
    Ok(())
}

/// Prints the audit log, newest first.
pub async fn run_audit(
    c: &Client,
    limit: u32,
    before: Option<i64>,
    actor: Option<String>,
) -> anyhow::Result<()> {
    let q = query_string(&[
        ("limit", Some(limit.to_string())),
        ("before", before.map(|b| b.to_string())),
        ("actor", actor),
    ]);
    let v = c.call(Method::GET, &format!("/audit?{q}"), None).await?;
    let cols: &[&str] = &["id", "at", "actor", "role", "method", "path", "status"];
    output(c, &v, Some(("entries", cols)));
    Ok(())
}
