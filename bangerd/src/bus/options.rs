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

/// An optional boolean, `None` when absent.
pub fn opt_bool(options: &Options, key: &str) -> Result<Option<bool>> {
    options
        .contains_key(key)
        .then(|| bool_opt(options, key, false))
        .transpose()
}

/// A `u` option, `None` when absent.
pub fn u32_opt(options: &Options, key: &str) -> Result<Option<u32>> {
    match options.get(key) {
        None => Ok(None),
        Some(v) => u32::try_from(v).map(Some).map_err(|_| {
            Error::invalid(format!(
                "option {key} must be an unsigned 32-bit integer (u), not {}",
                v.value_signature()
            ))
        }),
    }
}

/// A `t` option, `None` when absent.
pub fn u64_opt(options: &Options, key: &str) -> Result<Option<u64>> {
    match options.get(key) {
        None => Ok(None),
        Some(v) => u64::try_from(v).map(Some).map_err(|_| {
            Error::invalid(format!(
                "option {key} must be an unsigned 64-bit integer (t), not {}",
                v.value_signature()
            ))
        }),
    }
}

/// A string option, `None` when absent. Empty strings are refused.
pub fn str_opt(options: &Options, key: &str) -> Result<Option<String>> {
    match options.get(key) {
        None => Ok(None),
        Some(v) => {
            let s: String = v
                .try_clone()
                .ok()
                .and_then(|v| String::try_from(v).ok())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "option {key} must be a string (s), not {}",
                        v.value_signature()
                    ))
                })?;
            if s.is_empty() {
                return Err(Error::invalid(format!(
                    "option {key} is empty; leave it out instead"
                )));
            }
            Ok(Some(s))
        }
    }
}

/// A descriptor option (`h`), as a file of this process, `None` when absent.
pub fn fd_opt(options: &Options, key: &str) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsFd;
    match options.get(key) {
        None => Ok(None),
        Some(v) => {
            let fd = <&zbus::Fd<'_>>::try_from(v).map_err(|_| {
                Error::invalid(format!(
                    "option {key} must be a file descriptor (h), not {}: pass an open file, not a path",
                    v.value_signature()
                ))
            })?;
            let owned = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::failed(format!("cannot keep descriptor {key}: {e}")))?;
            Ok(Some(std::fs::File::from(owned)))
        }
    }
}

/// A string-array option, empty when absent.
pub fn strs_opt(options: &Options, key: &str) -> Result<Vec<String>> {
    match options.get(key) {
        None => Ok(Vec::new()),
        Some(v) => v
            .try_clone()
            .ok()
            .and_then(|v| Vec::<String>::try_from(v).ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "option {key} must be an array of strings (as), not {}",
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

    #[test]
    fn strings_and_string_arrays() {
        let o = opts(&[
            ("initrd", zbus::Variant::from("/boot/initrd")),
            ("services", zbus::Variant::from(vec!["ssh:22".to_owned()])),
            ("empty", zbus::Variant::from("")),
            ("num", zbus::Variant::from(3u32)),
        ]);
        assert_eq!(
            str_opt(&o, "initrd").expect("s").as_deref(),
            Some("/boot/initrd")
        );
        assert_eq!(str_opt(&o, "absent").expect("none"), None);
        assert!(
            str_opt(&o, "empty")
                .expect_err("empty")
                .message
                .contains("empty")
        );
        assert!(
            str_opt(&o, "num")
                .expect_err("type")
                .message
                .contains("(s)")
        );
        assert_eq!(strs_opt(&o, "services").expect("as"), ["ssh:22"]);
        assert!(strs_opt(&o, "absent").expect("none").is_empty());
        assert!(
            strs_opt(&o, "initrd")
                .expect_err("type")
                .message
                .contains("(as)")
        );
    }
}
