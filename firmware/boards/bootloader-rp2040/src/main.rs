//! The bootloader: at every reset, embassy-boot swaps in an image the application marked (its
//! signature was verified before), or swaps the previous one back when the new one never
//! confirmed itself; each step is recorded so a power cut at any write resumes, then the
//! active image runs. A watchdog resets the board if flash work hangs.

#![no_std]
#![no_main]

use core::cell::RefCell;
use cortex_m_rt::{entry, exception};
use embassy_boot_rp::{BootLoader, BootLoaderConfig, WatchdogFlash};
use embassy_sync::blocking_mutex::Mutex;
use embassy_time::Duration;

const FLASH_SIZE: usize = 2 * 1024 * 1024;

#[entry]
fn main() -> ! {
    let p = embassy_rp::init(Default::default());
    let flash = WatchdogFlash::<FLASH_SIZE>::start(p.FLASH, p.WATCHDOG, Duration::from_secs(8));
    let flash = Mutex::new(RefCell::new(flash));
    let config = BootLoaderConfig::from_linkerfile_blocking(&flash, &flash, &flash);
    let active = config.active.offset();
    let bl: BootLoader = BootLoader::prepare(config);
    // SAFETY: the active slot holds a complete image (swapped whole, or never touched).
    #[allow(unsafe_code)]
    unsafe {
        bl.load(embassy_rp::flash::FLASH_BASE as u32 + active)
    }
}

#[allow(unsafe_code)]
#[exception]
unsafe fn HardFault(_frame: &cortex_m_rt::ExceptionFrame) -> ! {
    cortex_m::peripheral::SCB::sys_reset()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    cortex_m::peripheral::SCB::sys_reset()
}
