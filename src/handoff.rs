//! What the layers above hand to the retry layer within one call: the budgets the call
//! deposited in, and the concurrency slot it holds.
//!
//! A layer's `call` runs its inner service's `call` before it returns, on the same
//! thread, in almost every stack: tower's layers, ours, routers like `Steer`. So an
//! outer layer can *offer* something in a thread-local for the length of its inner
//! `call`, and a retry layer called within takes it; the outer layer then sees whether
//! it was taken. Nothing is shared between calls or threads: an offer is withdrawn when
//! its call returns or unwinds.
//!
//! - **Budgets** ([`offer_budget`]): the request's extensions carry a budget through
//!   any stack, but their first value costs three allocations and a hash per lookup,
//!   about 900 instructions a call. A budget layer offers its budget here, and once a
//!   retry layer has taken one, stops writing the extensions (see the module docs of
//!   [`budget`](crate::budget), "Handing the budget down").
//! - **The slot** ([`offer_slot`]): with the concurrency layer above the retry layer, both
//!   wrapped the response body, each looking at every frame for the end of the stream.
//!   Taken here, the slot rides in the retry layer's body beside its attempt guard, both
//!   released by one end-of-stream check, and the concurrency layer's body only passes
//!   frames on (see the module docs of [`concurrency`](crate::concurrency), "One body
//!   wrapper").

use std::cell::{Cell, RefCell};

use crate::RetryBudget;
use crate::concurrency::Slot;

thread_local! {
    static BUDGETS: RefCell<Vec<RetryBudget>> = const { RefCell::new(Vec::new()) };
    static SLOT: Cell<Option<Slot>> = const { Cell::new(None) };
}

/// Runs `call` with `budget` offered to a retry layer inside it; returns what `call`
/// returned and whether a retry layer took the offer.
pub(crate) fn offer_budget<R>(budget: &RetryBudget, call: impl FnOnce() -> R) -> (R, bool) {
    let at = BUDGETS.with_borrow_mut(|offered| {
        offered.push(budget.clone());
        offered.len() - 1
    });
    // Withdrawn when `call` returns or unwinds: an offer never outlives its call.
    let withdraw = WithdrawBudget(at);
    let output = call();
    let taken = BUDGETS.with_borrow(|offered| offered.len() <= at);
    drop(withdraw);
    (output, taken)
}

/// Drops the offers made at or after its index, unless a retry layer took them.
struct WithdrawBudget(usize);

impl Drop for WithdrawBudget {
    fn drop(&mut self) {
        BUDGETS.with_borrow_mut(|offered| offered.truncate(self.0));
    }
}

/// Whether a budget layer above has offered `budget` in this call.
pub(crate) fn is_budget_offered(budget: &RetryBudget) -> bool {
    BUDGETS.with_borrow(|offered| offered.iter().any(|other| other.same(budget)))
}

/// Takes every budget offered in this call, outermost first, handing each to `each`.
/// The list keeps its capacity for the next call.
pub(crate) fn take_budgets(each: impl FnMut(RetryBudget)) {
    BUDGETS.with_borrow_mut(|offered| offered.drain(..).for_each(each));
}

/// Runs `call` with `slot` offered to a retry layer inside it; returns what `call`
/// returned and the slot, unless a retry layer took it.
pub(crate) fn offer_slot<R>(slot: Slot, call: impl FnOnce() -> R) -> (R, Option<Slot>) {
    // An offer of a layer further out (a concurrency layer above this one, with no
    // retry layer between) waits for this call to return.
    let restore = RestoreSlot(SLOT.replace(Some(slot)));
    let output = call();
    let left = SLOT.replace(None);
    drop(restore);
    (output, left)
}

/// Puts the outer offer back, also when the inner call unwinds (the slot offered to it,
/// if still there, is released then).
struct RestoreSlot(Option<Slot>);

impl Drop for RestoreSlot {
    fn drop(&mut self) {
        drop(SLOT.replace(self.0.take()));
    }
}

/// Takes the slot offered in this call, if any.
pub(crate) fn take_slot() -> Option<Slot> {
    SLOT.take()
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
        let ((), taken) = offer_budget(&a, || {
            assert!(is_budget_offered(&a) && !is_budget_offered(&b));
            let ((), inner_taken) = offer_budget(&b, || {
                let mut took = Vec::new();
                take_budgets(|budget| took.push(budget));
                assert_eq!(took.len(), 2);
                assert!(took[0].same(&a) && took[1].same(&b), "outermost first");
            });
            assert!(inner_taken);
        });
        assert!(taken);
        let ((), taken) = offer_budget(&a, || ());
        assert!(!taken, "nothing took it");
        assert!(!is_budget_offered(&a), "withdrawn after its call");
    }

    #[test]
    fn an_offer_is_withdrawn_when_its_call_panics() {
        let a = budget();
        let unwound = std::panic::catch_unwind(|| offer_budget(&a, || panic!("inner call")));
        assert!(unwound.is_err());
        assert!(!is_budget_offered(&a));
        take_budgets(|_| unreachable!("nothing is offered"));
    }
}
