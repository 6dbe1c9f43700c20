//! The Demi Conductor wire contract, generated from `proto/*.proto`.
//!
//! `plugin::v1` is what every plugin serves (`Plugin`) and what the
//! conductor serves to plugins (`Host`); `conductor::v1` is the
//! conductor's admin API; `android::v1` is the Android bridge plugin's
//! contract with its companion app. The standard `grpc.health.v1.Health` service
//! comes from `tonic-health`.

pub mod plugin {
    pub mod v1 {
        tonic::include_proto!("demi.plugin.v1");
    }
}

pub mod conductor {
    pub mod v1 {
        tonic::include_proto!("demi.conductor.v1");
    }
}

/// The Android bridge's contract (`demi-plugin-android`), what the
/// companion app compiles against.
pub mod android {
    pub mod v1 {
        tonic::include_proto!("demi.android.v1");
    }
}

/// Encoded `FileDescriptorSet` of the bridge's contract, for its reflection.
pub const ANDROID_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/android_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `plugin::v1` and `conductor::v1` and their imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/demi_descriptor.bin"));

/// The protocol version this build of the contract describes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest message a conductor reads, and what a plugin's gRPC server
/// reads unless told otherwise (tonic, grpc-go, grpc-python and grpc-java
/// alike): each job's delivery and each answer must fit in one.
pub const MAX_MESSAGE: usize = 4 << 20;

/// The environment handshake, shared by the conductor and every SDK.
/// `proto/README.md` is the language-neutral description.
pub mod handshake {
    /// Proves the process was launched by a conductor.
    pub const MAGIC_COOKIE_KEY: &str = "DEMI_PLUGIN_MAGIC_COOKIE";
    /// The value of [`MAGIC_COOKIE_KEY`]. It is not a secret: it only stops
    /// a plugin that someone runs by hand from sitting silently on a socket.
    pub const MAGIC_COOKIE_VALUE: &str = "7d3c0a91-demi-conductor-plugin";
    /// Comma-separated protocol versions the conductor accepts.
    pub const PROTOCOL_VERSIONS_KEY: &str = "DEMI_PLUGIN_PROTOCOL_VERSIONS";
    /// Absolute path of the Unix socket the plugin must serve on.
    pub const SOCKET_KEY: &str = "DEMI_PLUGIN_SOCKET";
    /// The plugin's name in the conductor's configuration.
    pub const NAME_KEY: &str = "DEMI_PLUGIN_NAME";
    /// The replica index of this instance, from 0.
    pub const INSTANCE_KEY: &str = "DEMI_PLUGIN_INSTANCE";
    /// How many replicas the instance's pool had when it started.
    pub const REPLICAS_KEY: &str = "DEMI_PLUGIN_REPLICAS";
    /// The conductor's plugin API socket (`demi.plugin.v1.Host`), never
    /// the operator's.
    pub const CONDUCTOR_SOCKET_KEY: &str = "DEMI_CONDUCTOR_SOCKET";
    /// The instance's token for the plugin API, sent on every call as
    /// `authorization: Bearer TOKEN`. Valid while the instance exists.
    pub const CONDUCTOR_TOKEN_KEY: &str = "DEMI_CONDUCTOR_TOKEN";
    /// A private folder (0700) holding the plugin's credentials, one file
    /// per `[plugins.NAME.credentials]` entry; unset when it has none.
    pub const CREDENTIALS_DIRECTORY_KEY: &str = "DEMI_CREDENTIALS_DIRECTORY";
    /// The plugin's own folder for durable data (0700), shared by its
    /// replicas and kept across restarts and conductor restarts:
    /// `state_dir/plugins/NAME`.
    pub const STATE_DIRECTORY_KEY: &str = "DEMI_STATE_DIRECTORY";
    /// Exit code for "this process was started wrongly": never restarted
    /// (sysexits.h `EX_CONFIG`).
    pub const EXIT_CONFIG: u8 = 78;
}

/// W3C trace context (`traceparent`), which the conductor sends on every
/// call to a plugin so a plugin's spans join the conductor's trace.
pub mod trace {
    use std::fmt;

    /// The gRPC metadata key (lower case, as HTTP/2 requires).
    pub const TRACEPARENT: &str = "traceparent";

    /// One `traceparent`: version 00, a 16-byte trace id, the caller's
    /// 8-byte span id, and whether the trace is sampled.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct TraceParent {
        pub trace_id: u128,
        pub parent_id: u64,
        pub sampled: bool,
    }

    impl TraceParent {
        /// A new trace, from `random` (the caller's random source keeps
        /// this crate free of one). Ids of zero are invalid in W3C, so zero
        /// becomes one.
        pub fn new(random: impl Fn() -> u64) -> Self {
            let trace_id = (u128::from(random()) << 64 | u128::from(random())).max(1);
            Self {
                trace_id,
                parent_id: random().max(1),
                sampled: true,
            }
        }

        /// The same trace, one hop further: a new parent span id.
        pub fn child(self, random: impl Fn() -> u64) -> Self {
            Self {
                parent_id: random().max(1),
                ..self
            }
        }

        /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else is `None`.
        pub fn parse(text: &str) -> Option<Self> {
            let mut parts = text.trim().split('-');
            let (version, trace, parent, flags) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let hex = |s: &str, len: usize| {
                s.len() == len
                    && s.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            };
            if version != "00"
                || parts.next().is_some()
                || !hex(trace, 32)
                || !hex(parent, 16)
                || !hex(flags, 2)
            {
                return None;
            }
            let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
            let parent_id = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
            let flags = u8::from_str_radix(flags, 16).ok()?;
            Some(Self {
                trace_id,
                parent_id,
                sampled: flags & 1 == 1,
            })
        }

        /// The trace id as 32 lower-case hex digits.
        pub fn trace_id_hex(&self) -> String {
            format!("{:032x}", self.trace_id)
        }
    }

    impl fmt::Display for TraceParent {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "00-{:032x}-{:016x}-{:02x}",
                self.trace_id,
                self.parent_id,
                u8::from(self.sampled)
            )
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_the_w3c_example() {
            let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let parsed = TraceParent::parse(text).unwrap();
            assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(parsed.parent_id, 0x00f0_67aa_0ba9_02b7);
            assert!(parsed.sampled);
            assert_eq!(parsed.to_string(), text);
        }

        #[test]
        fn refuses_malformed_and_all_zero_ids() {
            for bad in [
                "",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            ] {
                assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
            }
        }

        #[test]
        fn new_traces_are_valid_and_children_keep_the_trace() {
            let zero = TraceParent::new(|| 0);
            assert_eq!(TraceParent::parse(&zero.to_string()), Some(zero));
            let n = std::cell::Cell::new(7u64);
            let next = || {
                n.set(n.get() * 31 + 1);
                n.get()
            };
            let parent = TraceParent::new(next);
            let child = parent.child(next);
            assert_eq!(child.trace_id, parent.trace_id);
            assert_ne!(child.parent_id, parent.parent_id);
        }
    }
}
