//! Progress reporting and cancellation for long operations (model loading, adapter loading and
//! saving): a [`Control`] is passed down to the loops that read or write tensors, which report
//! `(done, total)` after each tensor and stop with [`PeftError::Aborted`] between tensors when
//! the caller asked to stop.
//!
//! Cancellation is cooperative and only between tensors: what was allocated so far is owned by
//! the aborted call's locals and is dropped when the error propagates, and operations that
//! change a model check for an abort only before their first change (an aborted call leaves the
//! model as it was).

use crate::error::{PeftError, Result};

/// What an operation reports and how it is asked to stop. Both hooks are optional; the
/// default ([`Control::NONE`]) reports nothing and never stops.
#[derive(Clone, Copy, Default)]
pub struct Control<'a> {
    /// Called with `(done, total)` in the operation's unit (tensors for every operation of this
    /// crate), `done` strictly increasing and the last call of a successful operation with
    /// `done == total`. Called on the thread that does the work.
    pub progress: Option<&'a dyn Fn(u64, u64)>,
    /// Polled between tensors; `true` stops the operation with [`PeftError::Aborted`].
    pub should_stop: Option<&'a dyn Fn() -> bool>,
}

impl<'a> Control<'a> {
    /// No reporting, no cancellation.
    pub const NONE: Control<'static> = Control { progress: None, should_stop: None };

    /// `Err(Aborted)` when the caller asked to stop.
    pub fn check(&self) -> Result<()> {
        match self.should_stop {
            Some(f) if f() => Err(PeftError::Aborted),
            _ => Ok(()),
        }
    }

    /// Report `(done, total)`.
    pub fn report(&self, done: u64, total: u64) {
        if let Some(p) = self.progress {
            p(done, total)
        }
    }
}

/// Counts the tensors of an operation whose total is known up front and reports each one.
pub struct Counter<'c, 'a> {
    ctl: &'c Control<'a>,
    done: u64,
    total: u64,
    /// Whether `(total, total)` was reported.
    finished_reported: bool,
}

impl<'c, 'a> Counter<'c, 'a> {
    /// A counter of `total` tensors reporting to `ctl` (nothing is reported yet).
    pub fn new(ctl: &'c Control<'a>, total: u64) -> Self {
        Counter { ctl, done: 0, total, finished_reported: false }
    }

    /// One more tensor done: report it, then stop if asked (`Err(Aborted)`).
    pub fn tick(&mut self) -> Result<()> {
        self.done = (self.done + 1).min(self.total);
        self.ctl.report(self.done, self.total);
        self.finished_reported = self.done == self.total;
        self.ctl.check()
    }

    /// Report `(total, total)` unless the last report already was (also for `total == 0`, so
    /// a successful operation always ends with a report of `done == total`).
    pub fn finish(&mut self) {
        if self.done < self.total || !self.finished_reported {
            self.done = self.total;
            self.ctl.report(self.done, self.total);
        }
        self.finished_reported = true;
    }

    /// Tensors counted so far.
    pub fn done(&self) -> u64 {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    #[test]
    fn counter_reports_each_tick_and_stops_when_asked() {
        let seen = RefCell::new(Vec::new());
        let polls = Cell::new(0);
        let progress = |d: u64, t: u64| seen.borrow_mut().push((d, t));
        let stop = || {
            polls.set(polls.get() + 1);
            polls.get() >= 3
        };
        let ctl = Control { progress: Some(&progress), should_stop: Some(&stop) };
        let mut c = Counter::new(&ctl, 5);
        assert!(c.tick().is_ok());
        assert!(c.tick().is_ok());
        assert!(matches!(c.tick(), Err(PeftError::Aborted)));
        assert_eq!(*seen.borrow(), vec![(1, 5), (2, 5), (3, 5)]);
        c.finish();
        assert_eq!(seen.borrow().last(), Some(&(5, 5)));
        let n = seen.borrow().len();
        c.finish();
        assert_eq!(seen.borrow().len(), n, "(total, total) is reported once");
        let mut empty = Counter::new(&ctl, 0);
        empty.finish();
        assert_eq!(seen.borrow().last(), Some(&(0, 0)), "an empty operation still ends with done == total");
        assert!(Control::NONE.check().is_ok());
    }
}
