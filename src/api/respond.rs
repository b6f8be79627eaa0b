//! Answers that carry a job result. The body is the result's JSON as the
//! store holds it ([`JobView`]: serialized once, when the job finished), in
//! a buffer shared by every answer that sends it, never copied: the
//! transport writes it to the socket from that buffer (see
//! [`crate::server`]). What answers hold in flight is under a budget of
//! bytes ([`ApiSettings::max_response_bytes_in_flight`]): a buffer counts
//! once, however many answers send it, from the first answer taking it
//! until the last one has been written out or dropped with its connection;
//! an answer that does not fit waits up to
//! [`ApiSettings::response_budget_wait`], then is refused `503` with
//! `Retry-After`.
//!
//! [`ApiSettings::max_response_bytes_in_flight`]: super::ApiSettings::max_response_bytes_in_flight
//! [`ApiSettings::response_budget_wait`]: super::ApiSettings::response_budget_wait

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::run::JobView;

/// The budget of result bytes held by answers in flight.
pub(super) struct ResponseBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    permits: Arc<Semaphore>,
    /// The budget in bytes (at most `u32::MAX`, the semaphore's unit).
    total: usize,
    wait: Duration,
    /// The charge of each buffer in flight, by its address (a charge keeps
    /// its buffer alive, so an address is not reused while it is listed).
    charges: Mutex<HashMap<usize, Weak<Charge>>>,
}

/// One buffer in flight, holding its share of the budget until the last
/// answer that sends it is done with it.
struct Charge {
    json: Bytes,
    _permit: OwnedSemaphorePermit,
    budget: Arc<BudgetInner>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let key = self.json.as_ptr() as usize;
        let mut charges = self
            .budget
            .charges
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Another answer may have charged the same buffer anew since this
        // charge's last holder let go: its entry stays.
        if charges.get(&key).is_some_and(|w| w.strong_count() == 0) {
            charges.remove(&key);
        }
    }
}

/// A body chunk that keeps its charge for as long as the transport holds
/// the chunk (until it is written to the socket).
struct Charged(Arc<Charge>);

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.0.json
    }
}

impl ResponseBudget {
    /// A budget of `total` bytes (capped at `u32::MAX`); an answer waits up
    /// to `wait` for room.
    pub(super) fn new(total: usize, wait: Duration) -> Self {
        let total = total.clamp(1, u32::MAX as usize);
        ResponseBudget {
            inner: Arc::new(BudgetInner {
                permits: Arc::new(Semaphore::new(total)),
                total,
                wait,
                charges: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Bytes of the budget not held by answers in flight.
    pub(super) fn available(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// The charge for sending `json`: the one already held if another
    /// answer sends the same buffer, else a new one (waiting for room).
    async fn charge(&self, json: &Bytes) -> Result<Arc<Charge>, ApiError> {
        let key = json.as_ptr() as usize;
        if let Some(charge) = self.held(key) {
            return Ok(charge);
        }
        // A buffer over the whole budget takes all of it.
        let size = json.len().clamp(1, self.inner.total) as u32;
        let acquire = self.inner.permits.clone().acquire_many_owned(size);
        let permit = match tokio::time::timeout(self.inner.wait, acquire).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Err(over_budget()),
        };
        let charge = Arc::new(Charge {
            json: json.clone(),
            _permit: permit,
            budget: self.inner.clone(),
        });
        let mut charges = self.inner.charges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(earlier) = charges.get(&key).and_then(Weak::upgrade) {
            // Charged by another answer meanwhile: share that one, and
            // give this one back once the lock is released (its `Drop`
            // takes the lock).
            drop(charges);
            drop(charge);
            return Ok(earlier);
        }
        charges.insert(key, Arc::downgrade(&charge));
        Ok(charge)
    }

    fn held(&self, key: usize) -> Option<Arc<Charge>> {
        let charges = self.inner.charges.lock().unwrap_or_else(|e| e.into_inner());
        charges.get(&key).and_then(Weak::upgrade)
    }

    /// An answer with `status` whose body is `view`'s JSON, shared and
    /// charged to the budget; `503` when the budget has no room in time.
    pub(super) async fn answer(&self, status: StatusCode, view: &JobView) -> Response {
        match self.charge(&view.json).await {
            Ok(charge) => {
                let body = Body::from(Bytes::from_owner(Charged(charge)));
                let mut response = (status, body).into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(refusal) => refusal.into_response(),
        }
    }
}

fn over_budget() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many large job results are being sent at once",
    )
    .hint("retry shortly")
    .retry_after(1)
}
