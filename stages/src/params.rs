use serde::de::DeserializeOwned;

use crate::ParamError;

/// Deserialises a stage's parameter table into `T`, naming the field on error.
///
/// `toml`'s own errors for a detached table say what is wrong ("invalid type:
/// string, expected f64") but not where; `serde_path_to_error` adds the path.
/// `T` should use `#[serde(deny_unknown_fields)]` so typos are caught.
pub fn parse_params<T: DeserializeOwned>(table: toml::Table) -> Result<T, ParamError> {
    let value = toml::Value::Table(table);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "*".to_string()
        } else {
            path
        };
        let inner = e.into_inner().to_string();
        // An unknown or missing key is reported at the table level; pull the name out.
        let field = if field == "*" {
            key_in_message(&inner).unwrap_or(field)
        } else {
            field
        };
        ParamError::new(field, inner.trim().to_string())
    })
}

/// Finds the key a serde message is about: "unknown field `x`", "missing field `x`".
fn key_in_message(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split('`').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only deserialised
    struct P {
        path: String,
        #[serde(default)]
        limit: Option<u64>,
    }

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn names_the_field_of_a_wrong_type() {
        let e = parse_params::<P>(table("path = 'a'\nlimit = 'ten'")).unwrap_err();
        assert_eq!(e.field, "limit");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn names_unknown_and_missing_fields() {
        let e = parse_params::<P>(table("path = 'a'\nlimt = 3")).unwrap_err();
        assert_eq!(e.field, "limt");
        let e = parse_params::<P>(table("limit = 3")).unwrap_err();
        assert_eq!(e.field, "path");
        assert!(e.message.contains("missing"), "{e}");
    }
}
