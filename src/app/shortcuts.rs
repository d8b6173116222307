//! The keyboard: every key press of a frame becomes an [`Action`], and the actions are applied one by one, in
//! the order they were typed, each to the state the previous one left.
//!
//! Why not `consume_key` per shortcut: it answers "was this key pressed this frame", so when keys arrive faster
//! than frames (a software renderer takes 100–200 ms per frame; `xdotool key --delay 5 n 2 n 3` is one frame)
//! every digit was applied before any N moved the cursor, and the digits relabelled whatever images the
//! auto-advance reached, human labels included.

use egui::{Event, Key, Modifiers};

use super::View;

/// What one key press asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    OpenFolder,
    Save,
    Show(View),
    ToggleHelp,
    Undo,
    Redo,
    SelectAll,
    ClearSelection,
    Train,
    /// Label the targets with class `Some(c)`, or remove their labels.
    Label(Option<usize>),
    LabelNext,
    ClassPicker,
    /// Move the cursor by this many positions in the visible order.
    Move(isize),
}

/// What the mapping from keys to actions depends on.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyContext {
    /// A text field has the keyboard: only the keys that work everywhere are shortcuts.
    pub text_focus: bool,
    pub view: View,
    /// Columns of the grid (the step of ↑ and ↓).
    pub cols: usize,
    /// Classes of the open project (digits beyond them do nothing).
    pub classes: usize,
}

pub(super) const DIGITS: [Key; 9] = [
    Key::Num1,
    Key::Num2,
    Key::Num3,
    Key::Num4,
    Key::Num5,
    Key::Num6,
    Key::Num7,
    Key::Num8,
    Key::Num9,
];

/// The action of one key press, or `None` when the key is not a shortcut here (it stays for the widgets).
pub(super) fn action_for(key: Key, mods: Modifiers, cx: &KeyContext) -> Option<Action> {
    let is = |m: Modifiers| mods.matches_logically(m);
    let plain = is(Modifiers::NONE);
    let cmd = is(Modifiers::COMMAND);
    // These work everywhere, also while a text field has the keyboard.
    match key {
        Key::O if cmd => return Some(Action::OpenFolder),
        Key::S if cmd => return Some(Action::Save),
        Key::Num1 if cmd => return Some(Action::Show(View::Label)),
        Key::Num2 if cmd => return Some(Action::Show(View::Graph)),
        Key::Num3 if cmd => return Some(Action::Show(View::Train)),
        Key::F1 if plain => return Some(Action::ToggleHelp),
        _ => {}
    }
    if cx.text_focus {
        return None;
    }
    match key {
        Key::Z if is(Modifiers::COMMAND | Modifiers::SHIFT) => return Some(Action::Redo),
        Key::Y if cmd => return Some(Action::Redo),
        Key::Z if cmd => return Some(Action::Undo),
        Key::A if cmd => return Some(Action::SelectAll),
        Key::Escape if plain => return Some(Action::ClearSelection),
        Key::T if plain => return Some(Action::Train),
        Key::Questionmark if plain || is(Modifiers::SHIFT) => return Some(Action::ToggleHelp),
        _ => {}
    }
    if cx.view != View::Label || !plain {
        return None;
    }
    if let Some(c) = DIGITS.iter().position(|&d| d == key) {
        return (c < cx.classes).then_some(Action::Label(Some(c)));
    }
    let cols = cx.cols.max(1) as isize;
    Some(match key {
        Key::Num0 | Key::Backspace | Key::Delete => Action::Label(None),
        Key::N => Action::LabelNext,
        Key::Slash | Key::L => Action::ClassPicker,
        Key::ArrowLeft => Action::Move(-1),
        Key::ArrowRight => Action::Move(1),
        Key::ArrowUp => Action::Move(-cols),
        Key::ArrowDown => Action::Move(cols),
        Key::PageUp => Action::Move(-cols * 4),
        Key::PageDown => Action::Move(cols * 4),
        Key::Home => Action::Move(isize::MIN / 2),
        Key::End => Action::Move(isize::MAX / 2),
        _ => return None,
    })
}

/// The action of one input event: a key press that is a shortcut in `cx`.
pub(super) fn action_of(e: &Event, cx: &KeyContext) -> Option<Action> {
    match e {
        Event::Key {
            key,
            pressed: true,
            modifiers,
            ..
        } => action_for(*key, *modifiers, cx),
        _ => None,
    }
}

/// Input a person gave to the window while something else had their attention (a native file dialog): keys,
/// text, clicks and clipboard events, which must not reach the grid afterwards.
pub(super) fn is_user_input(e: &Event) -> bool {
    matches!(
        e,
        Event::Key { .. }
            | Event::Text(_)
            | Event::Paste(_)
            | Event::Copy
            | Event::Cut
            | Event::PointerButton { .. }
            | Event::Ime(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> KeyContext {
        KeyContext {
            text_focus: false,
            view: View::Label,
            cols: 5,
            classes: 3,
        }
    }

    fn press(key: Key, modifiers: Modifiers) -> Event {
        Event::Key {
            key,
            physical_key: None,
            pressed: true,
            repeat: false,
            modifiers,
        }
    }

    #[test]
    fn keys_become_actions_in_the_order_typed() {
        let none = Modifiers::NONE;
        let events = [
            press(Key::N, none),
            press(Key::Num2, none),
            Event::Text("x".into()),
            press(Key::N, none),
            press(Key::Num3, none),
            press(Key::Num9, none),
            press(Key::ArrowDown, none),
        ];
        let actions: Vec<Action> = events.iter().filter_map(|e| action_of(e, &cx())).collect();
        assert_eq!(
            actions,
            [
                Action::LabelNext,
                Action::Label(Some(1)),
                Action::LabelNext,
                Action::Label(Some(2)),
                Action::Move(5),
            ]
        );
        // The text event and the digit beyond the classes are no shortcuts: they stay for the widgets.
        assert_eq!(action_of(&events[2], &cx()), None);
        assert_eq!(action_of(&events[5], &cx()), None);
    }

    #[test]
    fn a_text_field_keeps_the_labelling_keys_but_not_the_global_ones() {
        let typing = KeyContext {
            text_focus: true,
            ..cx()
        };
        assert_eq!(action_for(Key::Num1, Modifiers::NONE, &typing), None);
        assert_eq!(action_for(Key::Z, Modifiers::COMMAND, &typing), None);
        assert_eq!(
            action_for(Key::S, Modifiers::COMMAND, &typing),
            Some(Action::Save)
        );
        let graph = KeyContext {
            view: View::Graph,
            ..cx()
        };
        assert_eq!(action_for(Key::Num1, Modifiers::NONE, &graph), None);
        assert_eq!(
            action_for(Key::T, Modifiers::NONE, &graph),
            Some(Action::Train)
        );
        // Esc has one meaning: it never cancels a job.
        assert_eq!(
            action_for(Key::Escape, Modifiers::NONE, &cx()),
            Some(Action::ClearSelection)
        );
        assert_eq!(
            action_for(Key::Z, Modifiers::COMMAND | Modifiers::SHIFT, &cx()),
            Some(Action::Redo)
        );
    }
}
