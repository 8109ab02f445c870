//! The example lamp's host pieces: flash partitions in files and the firmware image format,
//! shared by the lamp (`ironlink-lamp`) and the image tool (`ironlink-lamp-image`).

pub mod flash;
pub mod image;
pub mod lossy;
