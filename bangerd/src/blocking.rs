//! The one way bangerd runs blocking work (SQLite, files, e2fsprogs)
//! from async code: on tokio's blocking pool, so that the executor's
//! worker threads, which serve the bus and publish job events, never wait
//! on a disk.

/// A blocking task that panicked, or was dropped at shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost(pub String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

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
    value(f).await.unwrap_or_else(|lost| Err(E::from(lost)))
}

/// Run `f`, which cannot fail, on the blocking pool: its value, or
/// [`Lost`] when it panicked.
pub async fn value<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Lost> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Lost(e.to_string()))
}

/// Run `f` on the blocking pool and let it finish on its own (nothing
/// waits for it).
pub fn detach(f: impl FnOnce() + Send + 'static) {
    drop(tokio::task::spawn_blocking(f));
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
