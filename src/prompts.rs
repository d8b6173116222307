//! Prompt templates for the positive and negative text nodes.
//!
//! A class's positive text node is the normalised mean of the CLIP text features of every template filled with
//! the class name (Tip-Adapter's `clip_classifier`); its negative node uses the same templates turned negative
//! ("a photo of **no** {}."), so that both kinds of node are averaged over the same wording and differ only by
//! the negation.
//!
//! The negation rule is the SPEC's, applied literally (first match only): " of a " → " of no ", else " of " →
//! " of no ", else the prefix "a photo of no ". It is crude for some templates ("a bad photo of the {}." becomes
//! "a bad photo of no the {}."); we keep it literal so that features extracted by different versions of this
//! program stay comparable.

/// CLIP's 7-template ImageNet ensemble as used by Tip-Adapter.
pub const IMAGENET_TEMPLATES: [&str; 7] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
];

/// The template for a user's own folder, where nothing is known about the domain.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

/// The single domain templates of CoOp / Tip-Adapter for the usual few-shot benchmarks, by dataset name.
pub const DOMAIN_TEMPLATES: [(&str, &str); 10] = [
    ("caltech101", "a photo of a {}."),
    ("oxford_pets", "a photo of a {}, a type of pet."),
    ("oxford_flowers", "a photo of a {}, a type of flower."),
    ("fgvc_aircraft", "a photo of a {}, a type of aircraft."),
    ("food101", "a photo of {}, a type of food."),
    ("dtd", "{} texture."),
    ("eurosat", "a centered satellite photo of {}."),
    ("stanford_cars", "a photo of a {}."),
    ("sun397", "a photo of a {}."),
    ("ucf101", "a photo of a person doing {}."),
];

/// The templates the field uses for a dataset name (`imagenet` gives the 7-template ensemble); `None` for an
/// unknown name, so the caller decides (usually [`DEFAULT_TEMPLATE`]).
pub fn templates_for(dataset: &str) -> Option<Vec<String>> {
    let key = dataset.trim().to_lowercase();
    if key == "imagenet" {
        return Some(IMAGENET_TEMPLATES.iter().map(|s| s.to_string()).collect());
    }
    DOMAIN_TEMPLATES
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, t)| vec![t.to_string()])
}

/// The negative form of a template (see the module docs for the rule).
pub fn negative_template(t: &str) -> String {
    if t.contains(" of a ") {
        t.replacen(" of a ", " of no ", 1)
    } else if t.contains(" of ") {
        t.replacen(" of ", " of no ", 1)
    } else {
        format!("a photo of no {t}")
    }
}

/// How a class name is written in a prompt: folder names often use underscores for spaces.
pub fn display_class_name(class: &str) -> String {
    class.replace('_', " ").trim().to_string()
}

/// Fills every `{}` of a template with the class name. A template without `{}` gets the name appended, so that
/// a user's half-typed template still names the class instead of producing one prompt for every class.
pub fn fill(t: &str, class: &str) -> String {
    let name = display_class_name(class);
    if t.contains("{}") {
        t.replace("{}", &name)
    } else {
        format!("{} {name}", t.trim_end())
    }
}

/// All prompts of one class, in template order.
pub fn prompts_for_class(templates: &[String], class: &str) -> Vec<String> {
    templates.iter().map(|t| fill(t, class)).collect()
}

/// All negative prompts of one class, in template order.
pub fn negative_prompts_for_class(templates: &[String], class: &str) -> Vec<String> {
    templates
        .iter()
        .map(|t| fill(&negative_template(t), class))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negation_follows_the_spec_rules_in_order() {
        assert_eq!(negative_template("a photo of a {}."), "a photo of no {}.");
        assert_eq!(
            negative_template("a photo of a {}, a type of flower."),
            "a photo of no {}, a type of flower."
        );
        assert_eq!(
            negative_template("a centered satellite photo of {}."),
            "a centered satellite photo of no {}."
        );
        assert_eq!(
            negative_template("{} texture."),
            "a photo of no {} texture."
        );
        assert_eq!(
            negative_template("a origami {}."),
            "a photo of no a origami {}."
        );
        assert_eq!(negative_template("itap of a {}."), "itap of no {}.");
    }

    #[test]
    fn fill_replaces_underscores_and_placeholders() {
        assert_eq!(
            fill("a photo of a {}.", "golden_retriever"),
            "a photo of a golden retriever."
        );
        assert_eq!(fill("photo", "cat"), "photo cat");
        assert_eq!(
            negative_prompts_for_class(&[DEFAULT_TEMPLATE.to_string()], "sea_lion"),
            vec!["a photo of no sea lion.".to_string()]
        );
        assert_eq!(templates_for("imagenet").map(|t| t.len()), Some(7));
        assert_eq!(templates_for("DTD"), Some(vec!["{} texture.".to_string()]));
        assert!(templates_for("my_folder").is_none());
    }
}
