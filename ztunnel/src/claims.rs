//! Which pods have enrollment work under way, so that reconcile passes can overlap without a
//! lock held across the slow part (netns, sockets, netlink, `nft`, eBPF maps): a pass claims
//! the pods it will enroll or unenroll under a short lock, does the work on blocking threads,
//! and releases each claim once the outcome is recorded. Another pass leaves claimed pods
//! alone (the periodic pass picks up whatever changed meanwhile).
//!
//! The capture's `retain` sweep (dropping state of pods that are neither enrolled nor pending)
//! must not see a pod half-enrolled, so it runs only when nothing is claimed, and no pass
//! claims anything while it runs.

use std::collections::HashSet;

/// The pods a pass has claimed: `stale` to unenroll, `fresh` to enroll.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub stale: Vec<String>,
    pub fresh: Vec<String>,
}

/// Claimed pods (by uid) and whether the retain sweep runs.
#[derive(Debug, Default)]
pub struct Claims {
    busy: HashSet<String>,
    retaining: bool,
}

impl Claims {
    /// Claim the `enrolled` pods that are not `wanted` and the `wanted` ones not yet enrolled,
    /// leaving out those claimed already. `None` while the retain sweep runs.
    pub fn plan<'a>(
        &mut self,
        enrolled: impl Iterator<Item = &'a str>,
        wanted: impl Iterator<Item = &'a str>,
    ) -> Option<Plan> {
        if self.retaining {
            return None;
        }
        let wanted: Vec<&str> = wanted.collect();
        let want: HashSet<&str> = wanted.iter().copied().collect();
        let enrolled: HashSet<&str> = enrolled.collect();
        let mut plan = Plan::default();
        for uid in &enrolled {
            if !want.contains(uid) && self.busy.insert(uid.to_string()) {
                plan.stale.push(uid.to_string());
            }
        }
        for uid in wanted {
            if !enrolled.contains(uid) && self.busy.insert(uid.to_string()) {
                plan.fresh.push(uid.to_string());
            }
        }
        plan.stale.sort();
        Some(plan)
    }

    /// Claim one pod for other work (removing its routing); false when it is claimed already.
    pub fn claim(&mut self, uid: &str) -> bool {
        self.busy.insert(uid.to_string())
    }

    /// Release a claim; true when nothing is claimed any more.
    pub fn release(&mut self, uid: &str) -> bool {
        self.busy.remove(uid);
        self.is_idle()
    }

    /// Nothing claimed and no sweep running.
    pub fn is_idle(&self) -> bool {
        self.busy.is_empty() && !self.retaining
    }

    /// Start the retain sweep if nothing is claimed; false otherwise (a later pass does it).
    pub fn begin_retain(&mut self) -> bool {
        if self.is_idle() {
            self.retaining = true;
            true
        } else {
            false
        }
    }

    pub fn end_retain(&mut self) {
        self.retaining = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_pod_is_left_to_its_pass() {
        let mut c = Claims::default();
        let plan = c.plan(["a", "b"].into_iter(), ["b", "c", "d"].into_iter());
        assert_eq!(
            plan,
            Some(Plan {
                stale: vec!["a".into()],
                fresh: vec!["c".into(), "d".into()],
            })
        );
        // An overlapping pass: c and d are being enrolled, a unenrolled; only e is new.
        let plan = c.plan(["b"].into_iter(), ["b", "c", "d", "e"].into_iter());
        assert_eq!(
            plan,
            Some(Plan {
                stale: vec![],
                fresh: vec!["e".into()],
            })
        );
        assert!(!c.claim("c"), "enrolling: its routing is not removed");
        for uid in ["a", "c", "d"] {
            assert!(!c.release(uid));
        }
        assert!(c.release("e"));
        assert!(c.claim("c"));
        assert!(c.release("c"));
    }

    #[test]
    fn retain_runs_alone() {
        let mut c = Claims::default();
        assert!(c.claim("a"));
        assert!(!c.begin_retain(), "a pod is half-enrolled");
        c.release("a");
        assert!(c.begin_retain());
        assert!(!c.is_idle());
        assert_eq!(c.plan([].into_iter(), ["x"].into_iter()), None);
        c.end_retain();
        assert!(c.is_idle());
        let plan = c.plan([].into_iter(), ["x"].into_iter()).unwrap();
        assert_eq!(plan.fresh, vec!["x".to_string()]);
    }
}
