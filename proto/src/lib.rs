//! The Demi Conductor wire contract, generated from `proto/*.proto`.
//!
//! `plugin::v1` is what every plugin serves; `conductor::v1` is the
//! conductor's admin API. The standard `grpc.health.v1.Health` service
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

/// Encoded `FileDescriptorSet` of every file above and its imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/demi_descriptor.bin"));

/// The protocol version this build of the contract describes.
pub const PROTOCOL_VERSION: u32 = 1;

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
    /// The conductor's own API socket, for plugins that submit work.
    pub const CONDUCTOR_SOCKET_KEY: &str = "DEMI_CONDUCTOR_SOCKET";
    /// Exit code for "this process was started wrongly": never restarted
    /// (sysexits.h `EX_CONFIG`).
    pub const EXIT_CONFIG: u8 = 78;
}
