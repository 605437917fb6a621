//! Other spellings of guarded header names (tollgate's upstream headers, the headers the
//! price book reads), found by a look-up of the request header's name rather than a
//! comparison with each guarded name: Envoy's Check answer asks it for every header of
//! every allowed request.

use std::collections::HashMap;

/// Guarded header names by their folded spelling ([`fold`]): a set made once (a price
/// book's at load, the constant lists' at first use), read per request without
/// allocating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderAliases {
    /// The guarded names by the hash of their folded spelling ([`folded_hash`]); each
    /// bucket is checked spelling by spelling, so a hash two names share only costs a
    /// comparison. Real names that fold alike (`x-pages`, `x_pages`) share a bucket.
    by_hash: HashMap<u64, Vec<String>>,
    /// The longest guarded name: a longer one is no alias, and is not hashed.
    len_max: usize,
}

impl HeaderAliases {
    pub fn new<S: AsRef<str>>(guarded: impl IntoIterator<Item = S>) -> Self {
        let mut out = Self::default();
        for real in guarded {
            let real = real.as_ref();
            out.len_max = out.len_max.max(real.len());
            let bucket = out.by_hash.entry(folded_hash(real)).or_default();
            if !bucket.iter().any(|r| r == real) {
                bucket.push(real.to_owned());
            }
        }
        out
    }

    /// Whether a request header's name is another spelling of a guarded one:
    /// `x_tollgate_account`, `x.tollgate.hold-id`, `x_signers`… A backend that maps
    /// header names to variables (CGI, WSGI, PHP: every character but letters and digits
    /// becomes `_`) reads it as the real one. Letters compare without case, any
    /// character that is not a letter or digit matches any other such; a guarded name is
    /// no alias of itself, but is of another guarded name it folds like. Nothing is
    /// allocated.
    pub fn is_alias(&self, name: &str) -> bool {
        if name.len() > self.len_max {
            return false;
        }
        self.by_hash.get(&folded_hash(name)).is_some_and(|bucket| {
            bucket
                .iter()
                .any(|real| name != real && folds_like(name, real))
        })
    }
}

/// A header name's byte as a backend that maps names to variables reads it: letters
/// lowercase, digits as they are, anything else one and the same `_`.
fn fold(b: u8) -> u8 {
    if b.is_ascii_alphanumeric() {
        b.to_ascii_lowercase()
    } else {
        b'_'
    }
}

fn folds_like(name: &str, real: &str) -> bool {
    name.len() == real.len()
        && name
            .bytes()
            .zip(real.bytes())
            .all(|(n, r)| fold(n) == fold(r))
}

/// FNV-1a of the folded bytes. A fixed hash is fine: a client who makes its names
/// collide with a guarded one's hash gains only a comparison with that bucket's few
/// names (the map's own hasher is keyed).
fn folded_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(fold(b))).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::HeaderAliases;

    /// The definition the look-up replaced (a scan of every guarded name), kept as the
    /// reference it must agree with.
    fn is_alias_by_scan(name: &str, guarded: &[&str]) -> bool {
        guarded.iter().any(|real| {
            name.len() == real.len()
                && name != *real
                && name.bytes().zip(real.bytes()).all(|(n, r)| {
                    if r.is_ascii_alphanumeric() {
                        n.eq_ignore_ascii_case(&r)
                    } else {
                        !n.is_ascii_alphanumeric()
                    }
                })
        })
    }

    #[test]
    fn the_look_up_agrees_with_a_scan_of_every_guarded_name() {
        let guarded = [
            "x-tollgate-account",
            "x-signers",
            "x_pages",
            "x-pages",
            "x-signature-method",
            "x-sig2",
            "a",
        ];
        let names = [
            "x-tollgate-account",
            "x_tollgate_account",
            "X.Tollgate.Account",
            "x-tollgate-accounts",
            "x-tollgateaaccount",
            "x-signers",
            "x_signers",
            "x~signers",
            "x-signer",
            "x-pages",
            "x_pages",
            "x.pages",
            "x-page5",
            "x-sig2",
            "x_sig2",
            "x-sig_",
            "x-sigz",
            "a",
            "A",
            "b",
            "_",
            "",
            "x-signature-method",
            "x.signature.method",
            "x-signature-methods",
            "x-sigñers",
            "authorization",
        ];
        let aliases = HeaderAliases::new(guarded);
        for name in names {
            assert_eq!(
                aliases.is_alias(name),
                is_alias_by_scan(name, &guarded),
                "{name:?}"
            );
        }
        // Real names that fold alike are each other's aliases, and an upper-case letter
        // makes another spelling.
        assert!(aliases.is_alias("x-pages") && aliases.is_alias("x_pages"));
        assert!(aliases.is_alias("A") && !aliases.is_alias("a"));
        assert!(!HeaderAliases::new(Vec::<String>::new()).is_alias("x_pages"));
    }
}
