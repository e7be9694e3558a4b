//! `mergeattack attacks`: the transfer attacks, their presets and defaults.
//! (`mergeattack attack`, crafting on a CLIP model through ONNX Runtime, is wired with the engine.)

use std::fmt::Write as _;

use clap::Args;
use mergeattack_core::attack::{self, AttackConfig, PARAMS, Preset, STUDY_DEFAULT};

#[derive(Args, Debug)]
pub struct AttacksArgs {
    /// Show only this preset's defaults (torchattacks or transferattack).
    #[arg(long)]
    pub preset: Option<String>,
    /// Also explain every hyper-parameter key (for `--set key=value`).
    #[arg(long)]
    pub params: bool,
}

/// The listing as text.
pub fn listing(preset: Option<Preset>, params: bool) -> String {
    let presets: Vec<Preset> = match preset {
        Some(p) => vec![p],
        None => Preset::ALL.to_vec(),
    };
    let mut out = String::new();
    for a in attack::registry() {
        let _ = writeln!(out, "{:<12} {}", a.name(), a.summary());
        if !a.aliases().is_empty() {
            let _ = writeln!(out, "{:<12}   aliases: {}", "", a.aliases().join(", "));
        }
        for p in &presets {
            let cfg = AttackConfig::for_attack(*a, *p);
            let default = if *p == Preset::TorchAttacks { " (default)" } else { "" };
            let _ = writeln!(out, "{:<12}   {}{}: {}", "", p.name(), default, cfg.describe());
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "study default: {}", STUDY_DEFAULT.join(", "));
    let _ = writeln!(
        out,
        "ensemble surrogate: several models as one (logit averaging, TransferAttack's default; or loss averaging)"
    );
    let _ = writeln!(out, "x_adv is quantised to 8 bits by floor(x * 255) / 255 unless quantize=round|none");
    if params {
        let _ = writeln!(out);
        let _ = writeln!(out, "parameters (fractions such as 8/255 accepted):");
        for p in PARAMS {
            let _ = writeln!(out, "  {:<14} {}", p.name, p.help);
        }
    }
    out
}

pub fn attacks(args: AttacksArgs) -> anyhow::Result<()> {
    let preset = args.preset.as_deref().map(Preset::parse).transpose().map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{}", listing(preset, args.params));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_attack_with_both_presets() {
        let text = listing(None, true);
        for a in attack::registry() {
            assert!(text.lines().any(|l| l.starts_with(a.name())), "{} missing", a.name());
        }
        assert!(text.contains("torchattacks (default): eps=8/255 alpha=2/255 steps=10 mu=1 quantize=floor"));
        assert!(
            text.contains(
                "transferattack: eps=16/255 alpha=1.6/255 steps=10 mu=1 neighbours=20 beta=1.5 quantize=floor"
            )
        );
        assert!(text.contains("  beta "));
        let one = listing(Some(Preset::TransferAttack), false);
        assert!(!one.contains("torchattacks (default)"));
        assert!(!one.contains("parameters"));
    }

    #[test]
    fn bad_preset_is_one_sentence() {
        let e = attacks(AttacksArgs { preset: Some("foolbox".into()), params: false }).unwrap_err();
        assert_eq!(e.to_string(), "attack parameter `preset` = `foolbox` is not one of: torchattacks, transferattack");
    }
}
