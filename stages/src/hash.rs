//! Content hashes: xxh3-128, hex-encoded.
//!
//! Used for prompt content hashes, file contents in fingerprints and request-cache
//! keys. Collisions between honest inputs are out of reach at 128 bits; nothing here
//! defends against adversarial inputs, which the job database never sees.

/// 32 hex digits of the xxh3-128 hash of `bytes`.
pub fn hex128(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}
