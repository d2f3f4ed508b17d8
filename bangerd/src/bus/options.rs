//! `a{sv}` options as they arrive: parsed by `banger_dbus::options`' own
//! structs (the ones clients send), refused with a typed error.

use banger_dbus::options::OptionError;

use crate::error::Error;

/// Options as they arrive.
pub type Options = banger_dbus::options::Dict;

/// The wire reply for options that were refused: `InvalidArgument`,
/// except a descriptor bangerd could not keep (its own failure).
pub fn parsed<T>(result: Result<T, OptionError>) -> Result<T, banger_dbus::Reply> {
    result.map_err(|e| {
        super::to_wire(match e {
            OptionError::Descriptor { .. } => Error::failed(e.to_string()),
            _ => Error::invalid(e.to_string()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_options_are_invalid_arguments() {
        let dict: Options = [(
            "vacum".to_owned(),
            zbus::OwnedVariant::try_from(zbus::Variant::from(true)).expect("owned"),
        )]
        .into();
        let reply = parsed(banger_dbus::options::Maintain::parse(&dict)).expect_err("unknown");
        let banger_dbus::Reply::Banger(banger_dbus::Error::InvalidArgument(message)) = reply else {
            panic!("{reply:?}");
        };
        assert!(message.contains("vacum"), "{message}");
    }
}
