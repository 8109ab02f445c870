//! A simulated Modbus TCP meter for scenarios: holding registers driven by value generators
//! (each property an f32, ABCD, two registers, in the order given), computed when the edge
//! reads them. It counts the reads it answered (each one a poll the edge must deliver), can go
//! silent (answers late, so the edge times out) and can be stopped (answers with an exception),
//! which is how a scenario ends its polls at a known count.

use crate::scenario::Series;
use anyhow::Result;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

/// What a scenario controls and reads of one meter.
#[derive(Debug, Default)]
pub struct SlaveControl {
    /// Reads answered with values (some may reach an edge that already gave up on them:
    /// after a silent spell, requests queued on the connection are answered late).
    pub answered: AtomicU64,
    /// While set, reads are answered (with an exception) only once it is cleared: the edge
    /// times out first.
    pub silent: AtomicBool,
    /// Once set, every read is answered with an exception.
    pub stopped: AtomicBool,
}

struct Slave {
    series: Mutex<Vec<Series>>,
    start: Instant,
    control: Arc<SlaveControl>,
}

impl Slave {
    /// The registers of every property at this moment.
    fn registers(&self) -> Vec<u16> {
        let t = self.start.elapsed();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series
            .iter_mut()
            .flat_map(|s| {
                let b = (s.next(t) as f32).to_bits();
                [(b >> 16) as u16, (b & 0xFFFF) as u16]
            })
            .collect()
    }
}

struct SlaveService(Arc<Slave>);

type Reply = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for SlaveService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Reply;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let s = self.0.clone();
        if s.control.stopped.load(Ordering::Relaxed) {
            return Box::pin(async { Err(ExceptionCode::ServerDeviceFailure) });
        }
        if s.control.silent.load(Ordering::Relaxed) {
            return Box::pin(async move {
                // Bounded: a scenario clears `silent` when the fault's duration is over.
                let deadline = Instant::now() + Duration::from_secs(3600);
                while s.control.silent.load(Ordering::Relaxed) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(ExceptionCode::ServerDeviceBusy)
            });
        }
        let reply = match req {
            Request::ReadHoldingRegisters(a, n) => {
                let regs = s.registers();
                match usize::from(a)
                    .checked_add(usize::from(n))
                    .and_then(|end| regs.get(usize::from(a)..end))
                {
                    Some(w) => {
                        s.control.answered.fetch_add(1, Ordering::Relaxed);
                        Ok(Response::ReadHoldingRegisters(w.to_vec()))
                    }
                    None => Err(ExceptionCode::IllegalDataAddress),
                }
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(async move { reply })
    }
}

/// Serves a meter on an ephemeral loopback port until the runtime ends.
pub async fn serve(
    series: Vec<Series>,
    start: Instant,
    control: Arc<SlaveControl>,
) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let slave = Arc::new(Slave {
        series: Mutex::new(series),
        start,
        control,
    });
    tokio::spawn(async move {
        let server = Server::new(l);
        let new_service = move |_| Ok(Some(SlaveService(slave.clone())));
        let on_connected = |stream, a| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, a, new_service) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    Ok(addr)
}
