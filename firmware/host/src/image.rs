//! The lamp's firmware image: a 64-byte header (`ILFW`, then the version, NUL-padded) and the
//! code. The running version is read from the active slot's header, as a bootloader-aware
//! application reads its own.

/// Header size.
pub const HEADER: usize = 64;
const MAGIC: &[u8; 4] = b"ILFW";

/// An image of `size` bytes (at least the header) for `version`; the code is a pattern.
pub fn build(version: &str, size: usize) -> Vec<u8> {
    let mut img: Vec<u8> = (0..size.max(HEADER))
        .map(|i| (i as u8).wrapping_mul(167) ^ (i >> 8) as u8)
        .collect();
    img[..HEADER].fill(0);
    img[..4].copy_from_slice(MAGIC);
    let v = version.as_bytes();
    let n = v.len().min(HEADER - 5);
    img[4..4 + n].copy_from_slice(&v[..n]);
    img
}

/// The version in an image's header; `None` when there is no image.
pub fn version_of(header: &[u8]) -> Option<String> {
    if header.len() < HEADER || &header[..4] != MAGIC {
        return None;
    }
    let v = &header[4..HEADER];
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8(v[..end].to_vec())
        .ok()
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_is_read_back() {
        let img = super::build("1.2.3", 1000);
        assert_eq!(img.len(), 1000);
        assert_eq!(super::version_of(&img).as_deref(), Some("1.2.3"));
        assert_eq!(super::version_of(&[0xff; 64]), None);
    }
}
