//! Over-the-air updates, cloud side (issue 18, first part): the operator's signing keys and
//! image signatures, in the scheme the firmware SDK verifies (`ironlink_firmware::ota`): an
//! ed25519 signature over the image's SHA-512 digest (what embassy-boot checks), next to the
//! SHA-256 and MD5 that Alibaba's notices carry in `sign`/`signMethod`.

pub mod sign;
