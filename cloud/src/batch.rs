//! The batching step every writer task shares: wait for work, take what is queued, and at
//! shutdown take everything left.

use tokio::sync::{mpsc, watch};

/// What [`next_batch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `buf` holds work; keep going.
    More,
    /// `buf` holds the last work (possibly none): store it, then stop.
    Last,
    /// Every sender is gone and nothing is left: stop now.
    Closed,
}

/// Fills `buf` with up to `max` queued items, waiting for at least one, or with everything
/// left once `stop` turns true.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    buf: &mut Vec<T>,
    max: usize,
    stop: &mut watch::Receiver<bool>,
) -> Batch {
    tokio::select! {
        n = rx.recv_many(buf, max) => if n == 0 { Batch::Closed } else { Batch::More },
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            while let Ok(item) = rx.try_recv() {
                buf.push(item);
            }
            Batch::Last
        }
    }
}
