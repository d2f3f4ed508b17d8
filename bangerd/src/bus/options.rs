//! Parsing `a{sv}` options: unknown keys and wrong types are errors.

use std::collections::HashMap;

use zbus::OwnedVariant;

use crate::error::{Error, Result};

/// Options as they arrive.
pub type Options = HashMap<String, OwnedVariant>;

/// Reject keys not in `known`.
pub fn only_known(method: &str, options: &Options, known: &[&str]) -> Result<()> {
    let mut unknown: Vec<&str> = options
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    let known = if known.is_empty() {
        "it takes none".to_owned()
    } else {
        format!("known options: {}", known.join(", "))
    };
    Err(Error::invalid(format!(
        "unknown option {} for {method}; {known}",
        unknown.join(", ")
    )))
}

/// A boolean option, `default` when absent.
pub fn bool_opt(options: &Options, key: &str, default: bool) -> Result<bool> {
    match options.get(key) {
        None => Ok(default),
        Some(v) => bool::try_from(v).map_err(|_| {
            Error::invalid(format!(
                "option {key} must be a boolean (b), not {}",
                v.value_signature()
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, zbus::Variant<'static>)]) -> Options {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    OwnedVariant::try_from(v.clone()).expect("owned"),
                )
            })
            .collect()
    }

    #[test]
    fn unknown_keys_are_named() {
        let o = opts(&[("vacum", zbus::Variant::from(true))]);
        let e = only_known("Maintain", &o, &["vacuum"]).expect_err("unknown");
        assert!(
            e.message.contains("vacum") && e.message.contains("vacuum"),
            "{}",
            e.message
        );
        assert!(only_known("Maintain", &opts(&[]), &["vacuum"]).is_ok());
    }

    #[test]
    fn wrong_type_is_named() {
        let o = opts(&[("vacuum", zbus::Variant::from("yes"))]);
        let e = bool_opt(&o, "vacuum", false).expect_err("wrong type");
        assert!(
            e.message.contains("(b)") && e.message.contains('s'),
            "{}",
            e.message
        );
        let o = opts(&[("vacuum", zbus::Variant::from(true))]);
        assert!(bool_opt(&o, "vacuum", false).expect("bool"));
        assert!(!bool_opt(&opts(&[]), "vacuum", false).expect("default"));
    }
}
