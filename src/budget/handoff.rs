//! The thread-local offer of the budgets to the retry layer below (see the module
//! docs of `budget`, "Handing the budget down").

use std::cell::RefCell;

use super::RetryBudget;

thread_local! {
    static OFFERED: RefCell<Vec<RetryBudget>> = const { RefCell::new(Vec::new()) };
}

/// Runs `call` with `budget` offered to a retry layer inside it; returns what `call`
/// returned and whether a retry layer took the offer.
pub(crate) fn offer<R>(budget: &RetryBudget, call: impl FnOnce() -> R) -> (R, bool) {
    let at = OFFERED.with_borrow_mut(|offered| {
        offered.push(budget.clone());
        offered.len() - 1
    });
    // Withdrawn when `call` returns or unwinds: an offer never outlives its call.
    let mut withdraw = Withdraw { at, taken: true };
    let output = call();
    withdraw.now();
    (output, withdraw.taken)
}

struct Withdraw {
    at: usize,
    taken: bool,
}

impl Withdraw {
    fn now(&mut self) {
        self.taken = OFFERED.with_borrow_mut(|offered| {
            if offered.len() > self.at {
                offered.truncate(self.at);
                false
            } else {
                true
            }
        });
        // Done: the drop has nothing left to do.
        self.at = usize::MAX;
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if self.at != usize::MAX {
            self.now();
        }
    }
}

/// Whether a budget layer above has offered `budget` in this call.
pub(crate) fn is_offered(budget: &RetryBudget) -> bool {
    OFFERED.with_borrow(|offered| offered.iter().any(|other| other.same(budget)))
}

/// Takes every budget offered in this call, outermost first, handing each to `each`;
/// says whether there was any. The list keeps its capacity for the next call.
pub(crate) fn take_all(mut each: impl FnMut(RetryBudget)) -> bool {
    OFFERED.with_borrow_mut(|offered| {
        let any = !offered.is_empty();
        offered.drain(..).for_each(&mut each);
        any
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget() -> RetryBudget {
        RetryBudget::new(Duration::from_secs(10), 0, 1.0)
    }

    #[test]
    fn an_offer_lasts_for_its_call_and_says_whether_it_was_taken() {
        let (a, b) = (budget(), budget());
        let ((), taken) = offer(&a, || {
            assert!(is_offered(&a) && !is_offered(&b));
            let ((), inner_taken) = offer(&b, || {
                let mut took = Vec::new();
                assert!(take_all(|budget| took.push(budget)));
                assert!(took[0].same(&a) && took[1].same(&b), "outermost first");
            });
            assert!(inner_taken);
        });
        assert!(taken);
        let ((), taken) = offer(&a, || ());
        assert!(!taken, "nothing took it");
        assert!(!is_offered(&a), "withdrawn after its call");
    }

    #[test]
    fn an_offer_is_withdrawn_when_its_call_panics() {
        let a = budget();
        let unwound = std::panic::catch_unwind(|| offer(&a, || panic!("inner call")));
        assert!(unwound.is_err());
        assert!(!is_offered(&a));
        assert!(!take_all(|_| unreachable!("nothing is offered")));
    }
}
