//! Flash partitions in files: NOR semantics (a write only clears bits, an erase sets them), so
//! that the lamp's A/B slots, embassy-boot's state and the download journal survive the process
//! being killed, as a board's flash survives a reset.

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Erase sector size of the simulated flash.
pub const SECTOR: usize = 4096;

/// A partition of `size` bytes backed by a file.
#[derive(Debug)]
pub struct FileFlash {
    file: File,
    size: usize,
}

/// A failed flash operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashError(NorFlashErrorKind);

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        self.0
    }
}

impl FileFlash {
    /// Opens (or creates, erased) the partition file.
    pub fn open(path: &Path, size: usize) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len() as usize;
        if len < size {
            file.write_all_at(&vec![0xff; size - len], len as u64)?;
        }
        Ok(FileFlash { file, size })
    }

    fn check(&self, offset: u32, len: usize, align: usize) -> Result<u64, FlashError> {
        let start = offset as usize;
        if !start.is_multiple_of(align) || !len.is_multiple_of(align) || start + len > self.size {
            return Err(FlashError(NorFlashErrorKind::OutOfBounds));
        }
        Ok(start as u64)
    }
}

impl ErrorType for FileFlash {
    type Error = FlashError;
}

impl ReadNorFlash for FileFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        let at = self.check(offset, bytes.len(), 1)?;
        self.file
            .read_exact_at(bytes, at)
            .map_err(|_| FlashError(NorFlashErrorKind::Other))
    }

    fn capacity(&self) -> usize {
        self.size
    }
}

impl NorFlash for FileFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        let at = self.check(from, to.saturating_sub(from) as usize, SECTOR)?;
        self.file
            .write_all_at(&vec![0xff; (to - from) as usize], at)
            .map_err(|_| FlashError(NorFlashErrorKind::Other))
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        let at = self.check(offset, bytes.len(), 4)?;
        let mut old = vec![0u8; bytes.len()];
        self.file
            .read_exact_at(&mut old, at)
            .map_err(|_| FlashError(NorFlashErrorKind::Other))?;
        for (o, b) in old.iter_mut().zip(bytes) {
            *o &= *b;
        }
        self.file
            .write_all_at(&old, at)
            .map_err(|_| FlashError(NorFlashErrorKind::Other))
    }
}
