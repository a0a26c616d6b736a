//! The difference between two configuration files, key by key, as `vmctl
//! config push` shows it before asking: what the peer's file has and this
//! node's file will replace. Keys are named as in `status`'s
//! `config_differences` (`cluster.KEY`, `node.NAME.KEY`, `modules.NAME.KEY`);
//! comments, order and formatting are not differences.

use std::collections::BTreeMap;

/// Errors reading one of the two files.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{which} configuration does not parse: {source}")]
    Parse {
        which: &'static str,
        source: toml::de::Error,
    },
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, v, out);
            }
        }
        // `[[node]]` and `[[module]]`: each table named by its `name`.
        toml::Value::Array(items)
            if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
        {
            let section = match prefix {
                "module" => "modules",
                other => other,
            };
            for (i, item) in items.iter().enumerate() {
                let name = item
                    .get("name")
                    .and_then(toml::Value::as_str)
                    .map_or_else(|| format!("[{i}]"), str::to_string);
                flatten(&format!("{section}.{name}"), item, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn keys(which: &'static str, text: &str) -> Result<BTreeMap<String, String>, DiffError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|source| DiffError::Parse { which, source })?;
    let mut out = BTreeMap::new();
    flatten("", &toml::Value::Table(table), &mut out);
    Ok(out)
}

/// The lines of the difference from `old` (the peer's file) to `new` (this
/// node's): `- KEY = VALUE` removed, `+ KEY = VALUE` added, `~ KEY: OLD ->
/// NEW` changed, sorted by key. Empty when the files say the same.
pub fn diff(old: &str, new: &str) -> Result<Vec<String>, DiffError> {
    let old = keys("the peer's", old)?;
    let new = keys("this node's", new)?;
    let mut lines = Vec::new();
    let mut all: Vec<&String> = old.keys().chain(new.keys()).collect();
    all.sort();
    all.dedup();
    for key in all {
        match (old.get(key), new.get(key)) {
            (Some(a), Some(b)) if a != b => lines.push(format!("~ {key}: {a} -> {b}")),
            (Some(a), None) => lines.push(format!("- {key} = {a}")),
            (None, Some(b)) => lines.push(format!("+ {key} = {b}")),
            _ => {}
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"
[cluster]
name = "pair1"
failover_timeout_ms = 3000

[[node]]
name = "node1"
addresses = ["10.0.0.1"]

[[module]]
name = "vm1"
port = 7101
"#;

    #[test]
    fn names_added_removed_and_changed_keys() {
        let new = OLD
            .replace(
                "failover_timeout_ms = 3000",
                "failover_timeout_ms = 4000 # slower",
            )
            .replace("port = 7101", "port = 7101\nlock_timeout_ms = 9000")
            + "\n[[module]]\nname = \"vm2\"\nport = 7102\n";
        let lines = diff(OLD, &new).unwrap();
        assert_eq!(
            lines,
            vec![
                "~ cluster.failover_timeout_ms: 3000 -> 4000",
                "+ modules.vm1.lock_timeout_ms = 9000",
                "+ modules.vm2.name = \"vm2\"",
                "+ modules.vm2.port = 7102",
            ]
        );
        assert!(diff(OLD, OLD).unwrap().is_empty());
        assert!(diff(OLD, "[cluster").is_err());
    }
}
