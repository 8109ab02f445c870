//! A network driver that loses frames: wraps another embassy-net driver and drops a share of
//! the frames it receives and sends, chosen by a seeded generator, so that a test can run the
//! stack over a lossy link where the kernel has no netem.

use embassy_net_driver::{Capabilities, Driver, HardwareAddress, LinkState, RxToken, TxToken};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Context;

/// Frames lost by every [`Lossy`] of the process: received, sent.
pub static LOST: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// `inner`, losing `percent` % of frames each way.
#[derive(Debug)]
pub struct Lossy<D> {
    inner: D,
    percent: u8,
    seed: u64,
}

impl<D> Lossy<D> {
    /// Wraps `inner`; `percent` 0 loses nothing.
    pub fn new(inner: D, percent: u8, seed: u64) -> Self {
        Lossy {
            inner,
            percent: percent.min(100),
            seed: seed | 1,
        }
    }

    fn lose(&mut self) -> bool {
        if self.percent == 0 {
            return false;
        }
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed % 100) < u64::from(self.percent)
    }
}

/// A frame to send, or one that is lost (written into a scratch buffer and forgotten).
#[derive(Debug)]
pub enum LossyTx<T> {
    /// Sent through the inner driver.
    Send(T),
    /// Lost.
    Lost,
}

impl<T: TxToken> TxToken for LossyTx<T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        match self {
            LossyTx::Send(t) => t.consume(len, f),
            LossyTx::Lost => {
                let mut scratch = vec![0u8; len];
                f(&mut scratch)
            }
        }
    }
}

impl<D: Driver> Driver for Lossy<D> {
    type RxToken<'a>
        = D::RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = LossyTx<D::TxToken<'a>>
    where
        Self: 'a;

    fn receive(&mut self, cx: &mut Context<'_>) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.lose() {
            // Take one frame and forget it; the stack polls again at once.
            if let Some((rx, _tx)) = self.inner.receive(cx) {
                rx.consume(|_| ());
                LOST[0].fetch_add(1, Ordering::Relaxed);
            }
            cx.waker().wake_by_ref();
            return None;
        }
        let lose = self.lose();
        let (rx, tx) = self.inner.receive(cx)?;
        Some((
            rx,
            if lose {
                LossyTx::Lost
            } else {
                LossyTx::Send(tx)
            },
        ))
    }

    fn transmit(&mut self, cx: &mut Context<'_>) -> Option<Self::TxToken<'_>> {
        if self.lose() {
            LOST[1].fetch_add(1, Ordering::Relaxed);
            return Some(LossyTx::Lost);
        }
        self.inner.transmit(cx).map(LossyTx::Send)
    }

    fn link_state(&mut self, cx: &mut Context<'_>) -> LinkState {
        self.inner.link_state(cx)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn hardware_address(&self) -> HardwareAddress {
        self.inner.hardware_address()
    }
}
