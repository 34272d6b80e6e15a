//! [`PendingSync`]: a sync of a partial that was started and may still be running
//! ([`super::PartialFile::start_sync`]), so that the writer goes on writing the next batch while the store makes
//! the last one durable (on an object store: the batch's chunk PUTs, then its journal entry). It owns only the
//! answer; what "durable" means is the volume's. A volume whose sync blocks anyway (the local disk) hands out one
//! that has already finished, so its writer behaves exactly as with [`super::PartialFile::sync_data`].

use std::io;

use tokio::sync::oneshot;

/// A sync that was started: the writes made before it are durable once it finished with `Ok`.
#[derive(Debug)]
pub struct PendingSync(State);

#[derive(Debug)]
enum State {
    /// Ended; the result until it is taken.
    Finished(Option<io::Result<()>>),
    /// Still running; the volume sends its result.
    Running(oneshot::Receiver<io::Result<()>>),
}

/// The volume dropped a sync without answering (its task ended early): nothing is known durable.
fn abandoned() -> io::Error {
    io::Error::other("a sync ended without an answer")
}

/// The result of a sync was asked for twice.
fn taken() -> io::Error {
    io::Error::other("the result of this sync was already taken")
}

impl PendingSync {
    /// A sync that already ended with `result`.
    pub fn finished(result: io::Result<()>) -> Self {
        PendingSync(State::Finished(Some(result)))
    }

    /// A sync whose result the volume will send on the other end of `answer`.
    pub fn running(answer: oneshot::Receiver<io::Result<()>>) -> Self {
        PendingSync(State::Running(answer))
    }

    /// The result if the sync has ended, without waiting; `None` while it runs. The result is given once.
    pub fn try_result(&mut self) -> Option<io::Result<()>> {
        let result = match &mut self.0 {
            State::Finished(result) => result.take().unwrap_or_else(|| Err(taken())),
            State::Running(answer) => match answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => Err(abandoned()),
                Ok(result) => result,
            },
        };
        self.0 = State::Finished(None);
        Some(result)
    }

    /// Waits for the result. Blocks: call from a blocking thread, never on an async runtime's worker.
    pub fn wait(mut self) -> io::Result<()> {
        self.wait_here()
    }

    /// Waits for the result, which is given once, as [`PendingSync::wait`] does.
    pub fn wait_here(&mut self) -> io::Result<()> {
        match std::mem::replace(&mut self.0, State::Finished(None)) {
            State::Finished(result) => result.unwrap_or_else(|| Err(taken())),
            State::Running(answer) => answer.blocking_recv().unwrap_or_else(|_| Err(abandoned())),
        }
    }

    /// Waits for the result in async code (cancel-safe: a `select!` may drop this future and call it again).
    pub async fn result(&mut self) -> io::Result<()> {
        let result = match &mut self.0 {
            State::Finished(result) => result.take().unwrap_or_else(|| Err(taken())),
            State::Running(answer) => answer.await.unwrap_or_else(|_| Err(abandoned())),
        };
        self.0 = State::Finished(None);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_sync_answers_once() {
        let mut sync = PendingSync::finished(Ok(()));
        assert!(matches!(sync.try_result(), Some(Ok(()))));
        assert!(matches!(sync.try_result(), Some(Err(_))));
    }

    #[test]
    fn a_running_sync_answers_when_the_volume_does_and_fails_when_it_never_will() {
        let (tx, rx) = oneshot::channel();
        let mut sync = PendingSync::running(rx);
        assert!(sync.try_result().is_none());
        tx.send(Ok(())).unwrap();
        assert!(matches!(sync.try_result(), Some(Ok(()))));

        let (tx, rx) = oneshot::channel::<io::Result<()>>();
        drop(tx);
        assert!(PendingSync::running(rx).wait().is_err());
    }
}
