//! Fuzz targets for what peers and users send us, and the engine that runs them
//! (`cargo xtask fuzz <target> --seconds N`).

pub mod dns;
pub mod engine;
pub mod hbone;
pub mod xds;
pub mod yaml;

use engine::Target;

/// Every target, in the order `all` runs them.
pub static TARGETS: [Target; 5] = [
    hbone::TARGET,
    xds::TARGET,
    dns::TARGET,
    yaml::ZTUNNEL_CONFIG,
    yaml::PILOT_YAML,
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is a valid input that meets its target's invariants (a seed that fails would
    /// make every run report a crash), and names are unique for `target`.
    #[test]
    fn seeds_pass_every_target() {
        for t in &TARGETS {
            assert!(std::ptr::eq(target(t.name).unwrap(), t), "{}", t.name);
            for seed in (t.seeds)() {
                (t.run)(&seed, &mut engine::Features::default());
            }
        }
    }
}
