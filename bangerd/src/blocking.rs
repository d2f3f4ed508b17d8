//! The one way bangerd runs blocking work (SQLite, files, e2fsprogs)
//! from async code: on tokio's blocking pool, so that the executor's
//! worker threads, which serve the bus and publish job events, never wait
//! on a disk.

/// A blocking task that panicked, or was dropped at shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost(pub String);

impl From<Lost> for crate::error::Error {
    fn from(lost: Lost) -> Self {
        crate::error::Error::failed(format!("internal task failed: {}", lost.0))
    }
}

impl From<Lost> for crate::store::StoreError {
    fn from(lost: Lost) -> Self {
        crate::store::StoreError::Task(lost.0)
    }
}

/// Run `f` on the blocking pool and wait for it.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> crate::error::Result<T> {
    run(f).await
}

/// [`blocking`] for work with errors of its own (the store's, an
/// update's).
pub async fn run<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<Lost> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(E::from(Lost(e.to_string()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};

    #[tokio::test]
    async fn results_come_back_and_a_panic_is_an_error() {
        let on = std::thread::current().id();
        let off = blocking(move || Ok::<_, Error>(std::thread::current().id()))
            .await
            .expect("ran");
        assert_ne!(on, off, "ran on the async thread");
        let e = blocking(|| -> Result<(), Error> { panic!("boom") })
            .await
            .expect_err("panicked");
        assert_eq!(e.kind, ErrorKind::Failed);
        assert!(e.message.contains("internal task failed"), "{e}");
    }
}
