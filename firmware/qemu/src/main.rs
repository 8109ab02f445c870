//! The firmware SDK's self-test on a Cortex-M4F (`qemu-system-arm -machine mps2-an386`), with
//! semihosting for output and the exit code, and the peak stack measured by painting. On the
//! host the same scenarios run with their output on stdout.
//!
//! ```text
//! cargo build --profile firmware -p ironlink-firmware-qemu --target thumbv7em-none-eabihf
//! qemu-system-arm -machine mps2-an386 -nographic -semihosting-config enable=on,target=native \
//!     -kernel $CARGO_TARGET_DIR/thumbv7em-none-eabihf/firmware/ironlink-firmware-qemu
//! ```

#![cfg_attr(target_os = "none", no_std, no_main)]
// Painting the stack and reading the linker's symbols need raw pointers.
#![cfg_attr(target_os = "none", allow(unsafe_code))]

#[cfg(target_os = "none")]
mod bare {
    use core::ptr::{addr_of, addr_of_mut};
    use cortex_m_rt::entry;
    use cortex_m_semihosting::{debug, hprintln};
    use ironlink_firmware::selftest;

    const PAINT: u32 = 0x5afe_c0de;

    /// The OTA scenario's simulated flash (18 KiB), kept out of the stack so that the peak stack
    /// printed is the SDK's own.
    static mut OTA_MEMORY: selftest::OtaMemory = selftest::OtaMemory::new();

    extern "C" {
        static mut __ebss: u32;
        static _stack_start: u32;
    }

    /// Fills the free RAM between the statics and the current stack with a pattern.
    #[inline(never)]
    fn paint() {
        let sp = cortex_m::register::msp::read() as usize;
        let mut p = addr_of_mut!(__ebss) as usize;
        // Stop well below this frame.
        while p + 512 < sp {
            unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
            p += 4;
        }
    }

    /// Bytes of stack ever used: from the top down to the deepest word not painted.
    fn peak_stack() -> usize {
        let top = addr_of!(_stack_start) as usize;
        let mut p = addr_of_mut!(__ebss) as usize;
        while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
            p += 4;
        }
        top - p
    }

    #[entry]
    fn main() -> ! {
        hprintln!("ironlink-firmware self-test on Cortex-M4F (mps2-an386)");
        let (mut passed, mut failed, mut checks) = (0, 0, 0);
        for (name, scenario) in selftest::SCENARIOS {
            // Painted afresh before each scenario, so each one's peak stack is its own.
            paint();
            let outcome = if name.starts_with("ota:") {
                // Only this loop touches the static, once.
                selftest::ota_update_in(unsafe { &mut *addr_of_mut!(OTA_MEMORY) })
            } else {
                scenario()
            };
            match outcome {
                Ok(n) => {
                    passed += 1;
                    checks += n;
                    hprintln!(
                        "ok   {} ({} checks, peak stack {} bytes)",
                        name,
                        n,
                        peak_stack()
                    );
                }
                Err(check) => {
                    failed += 1;
                    hprintln!("FAIL {}: {}", name, check);
                }
            }
        }
        let statics = addr_of_mut!(__ebss) as usize - 0x2000_0000;
        hprintln!("statics: {} bytes", statics);
        hprintln!("{} passed, {} failed ({} checks)", passed, failed, checks);
        if failed == 0 {
            debug::exit(debug::EXIT_SUCCESS);
        } else {
            debug::exit(debug::EXIT_FAILURE);
        }
        loop {
            cortex_m::asm::bkpt();
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        hprintln!("panic: {}", info);
        debug::exit(debug::EXIT_FAILURE);
        loop {
            cortex_m::asm::bkpt();
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    let r = ironlink_firmware::selftest::run(&mut |name, outcome| match outcome {
        Ok(n) => println!("ok   {name} ({n} checks)"),
        Err(check) => println!("FAIL {name}: {check}"),
    });
    if let Err(f) = r {
        eprintln!("self-test failed: {}: {}", f.scenario, f.check);
        std::process::exit(1);
    }
}
