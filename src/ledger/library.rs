//! The ledger's Lua code as one Redis function library: lua/lib.lua once, then every
//! ledger script registered as a function whose body is the script's file.
//!
//! Why functions (`FUNCTION LOAD`, `FCALL`) and not scripts (`EVALSHA`): a script is one
//! Lua chunk, so prepending lib.lua to each one made Redis create the library's ~40
//! closures and constants again on every call — a tenth of the debit script's cost
//! (docs/BENCHMARKS.md). A library's top level runs once, when it is loaded; a call only
//! runs `begin` (lib.lua) and the script's own body. Functions also live in Redis's
//! data (RDB, AOF, replication): a failed-over replica has them, where a script cache
//! starts empty.
//!
//! The library and function names carry a digest of the code, so two tollgate versions
//! (a rolling upgrade) each call their own functions in the same Redis.

use redis::Cmd;
use sha2::{Digest, Sha256};

/// Hex digits of the code digest in the library and function names.
const VERSION_DIGITS: usize = 16;

/// Every tollgate library's name starts with this (then the code digest).
pub const NAME_PREFIX: &str = "tollgate_";

/// Whether `name` is a tollgate library's: the prefix, then exactly the digest's
/// lowercase hex digits (another application's `tollgate_helpers` is not).
pub fn is_tollgate_library(name: &str) -> bool {
    name.strip_prefix(NAME_PREFIX).is_some_and(|version| {
        version.len() == VERSION_DIGITS
            && version
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A ledger script: its name (the function's suffix) and its file's text.
pub struct ScriptSource {
    pub name: &'static str,
    pub body: &'static str,
}

#[derive(Debug)]
pub struct Library {
    name: String,
    function_prefix: String,
    source: String,
    functions: usize,
}

impl Library {
    /// Builds the library from lib.lua and the scripts' bodies.
    pub fn new(lib: &str, scripts: &[ScriptSource]) -> Self {
        let mut digest = Sha256::new();
        digest.update(lib.as_bytes());
        for s in scripts {
            digest.update([0]);
            digest.update(s.name.as_bytes());
            digest.update([0]);
            digest.update(s.body.as_bytes());
        }
        let version = &hex::encode(digest.finalize())[..VERSION_DIGITS];
        let name = format!("{NAME_PREFIX}{version}");
        let function_prefix = format!("tg_{version}_");
        let mut source = String::with_capacity(
            lib.len() + scripts.iter().map(|s| s.body.len() + 160).sum::<usize>() + 64,
        );
        source.push_str("#!lua name=");
        source.push_str(&name);
        source.push('\n');
        source.push_str(lib);
        for s in scripts {
            // The body runs as the function's own block: its locals and `return`s are the
            // function's. The line breaks keep a body's last line (a comment, say) apart.
            source.push_str("\nredis.register_function('");
            source.push_str(&function_prefix);
            source.push_str(s.name);
            source.push_str("', function(keys, args)\nbegin(keys, args)\n");
            source.push_str(s.body);
            source.push_str("\nend)\n");
        }
        Self {
            name,
            function_prefix,
            source,
            functions: scripts.len(),
        }
    }

    /// The library's name (`FUNCTION LIST LIBRARYNAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many functions the library registers.
    pub fn functions(&self) -> usize {
        self.functions
    }

    /// The function a script is registered as.
    pub fn function(&self, script: &str) -> String {
        format!("{}{script}", self.function_prefix)
    }

    /// `FUNCTION LOAD REPLACE <source>`: loads the library, or replaces it with itself.
    pub fn load_cmd(&self) -> Cmd {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&self.source);
        cmd
    }

    /// The library's source as Redis loads it.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_digest_named_libraries_are_tollgate_s() {
        let a = Library::new("-- lib", &[]);
        assert!(is_tollgate_library(a.name()));
        assert!(is_tollgate_library("tollgate_0123456789abcdef"));
        for other in [
            "tollgate_helpers",
            "tollgate_0123456789ABCDEF",
            "tollgate_0123456789abcde",
            "tollgate_0123456789abcdef0",
            "my_tollgate_0123456789abcdef",
        ] {
            assert!(!is_tollgate_library(other), "{other}");
        }
    }

    #[test]
    fn names_follow_the_code() {
        let a = Library::new(
            "local function f() end",
            &[ScriptSource {
                name: "debit",
                body: "return 1",
            }],
        );
        let b = Library::new(
            "local function f() end",
            &[ScriptSource {
                name: "debit",
                body: "return 2",
            }],
        );
        assert_ne!(a.name(), b.name(), "another body, another library");
        assert!(a.function("debit").starts_with("tg_"));
        assert!(a.function("debit").ends_with("_debit"));
        assert!(a
            .source()
            .starts_with(&format!("#!lua name={}\n", a.name())));
        assert!(a.source().contains(&format!(
            "redis.register_function('{}'",
            a.function("debit")
        )));
    }
}
