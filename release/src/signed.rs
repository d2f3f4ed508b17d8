//! minisign signatures over banger's signed documents (release manifests,
//! catalogs): the compiled-in release key, and the `key:value` fields of a
//! signature's trusted comment (which the signature covers).

pub use minisign_verify::PublicKey;
use minisign_verify::Signature;

/// banger's release public key (`packaging/release-key.pub`).
pub const RELEASE_KEY: &str = include_str!("../../packaging/release-key.pub");

/// Why a key or signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A public key could not be parsed.
    #[error("not a minisign public key ({0})")]
    Key(String),
    /// The signature file could not be parsed.
    #[error("the signature file is malformed ({0})")]
    Malformed(String),
    /// No trusted key verifies the signature.
    #[error("{0}")]
    Rejected(String),
}

/// Parse one public key: a bare base64 key line, or a whole `.pub` file
/// (comment line and key line).
pub fn parse_key(text: &str) -> Result<PublicKey, SignatureError> {
    let text = text.trim();
    let parsed = if text.contains('\n') {
        PublicKey::decode(text)
    } else {
        PublicKey::from_base64(text)
    };
    parsed.map_err(|e| SignatureError::Key(e.to_string()))
}

/// Check `signature` (a `.minisig` file's text) over `data` against
/// `keys`; returns the signature's trusted comment.
pub fn verify(data: &[u8], signature: &str, keys: &[PublicKey]) -> Result<String, SignatureError> {
    let signature =
        Signature::decode(signature).map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let mut last = None;
    for key in keys {
        match key.verify(data, &signature, false) {
            Ok(()) => return Ok(signature.trusted_comment().to_owned()),
            Err(e) => last = Some(e.to_string()),
        }
    }
    Err(SignatureError::Rejected(
        last.unwrap_or_else(|| "no trusted key".into()),
    ))
}

/// The value of `key:value` among a trusted comment's fields (separated
/// by tabs or spaces).
pub fn trusted_field<'a>(comment: &'a str, key: &str) -> Option<&'a str> {
    comment
        .split(['\t', ' '])
        .filter_map(|f| f.split_once(':'))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_key_parses() {
        parse_key(RELEASE_KEY).expect("packaging/release-key.pub");
    }

    #[test]
    fn trusted_fields_are_found_by_key() {
        let comment = "timestamp:1\tfile:manifest.json version:1.2.3";
        assert_eq!(trusted_field(comment, "version"), Some("1.2.3"));
        assert_eq!(trusted_field(comment, "file"), Some("manifest.json"));
        assert_eq!(trusted_field(comment, "serial"), None);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(parse_key("nope"), Err(SignatureError::Key(_))));
        let key = parse_key(RELEASE_KEY).expect("key");
        assert!(matches!(
            verify(b"data", "not a signature", &[key]),
            Err(SignatureError::Malformed(_))
        ));
    }
}
