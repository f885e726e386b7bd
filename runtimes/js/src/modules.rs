//! Which modules a function can import: its own files (a specifier that starts with `./`, `../`
//! or `/`, resolved against the importing module's directory, naming a `.js` or `.mjs` file) and
//! the runtime's built-in `node:fs` and `node:fs/promises` ([`crate::fs`]).

use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::{Ctx, Module};

/// The built-in modules: the names a function may import them by, and the name each resolves to.
const BUILT_IN: [(&str, &str); 4] = [
    ("node:fs", "node:fs"),
    ("fs", "node:fs"),
    ("node:fs/promises", "node:fs/promises"),
    ("fs/promises", "node:fs/promises"),
];

/// Resolves and loads the modules a function imports.
pub struct Files;

impl Resolver for Files {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        if let Some((_, resolved)) = BUILT_IN.iter().find(|(alias, _)| *alias == name) {
            return Ok((*resolved).to_string());
        }
        if !(name.starts_with("./") || name.starts_with("../") || name.starts_with('/')) {
            return Err(rquickjs::Error::new_resolving_message(
                base,
                name,
                "only the function's own files (./, ../ or /) and node:fs can be imported; pack with `thaw pack --bundle` to bundle npm packages in",
            ));
        }
        let mut path: Vec<&str> = if name.starts_with('/') {
            Vec::new()
        } else {
            base.rsplit_once('/').map_or("", |(dir, _)| dir).split('/').filter(|p| !p.is_empty()).collect()
        };
        for part in name.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    path.pop();
                }
                part => path.push(part),
            }
        }
        Ok(format!("/{}", path.join("/")))
    }
}

impl Loader for Files {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js>> {
        match name {
            "node:fs" => return Module::declare_def::<crate::fs::Fs, _>(ctx.clone(), name),
            "node:fs/promises" => return Module::declare_def::<crate::fs::FsPromises, _>(ctx.clone(), name),
            _ => {}
        }
        if !(name.ends_with(".js") || name.ends_with(".mjs")) {
            return Err(rquickjs::Error::new_loading_message(name, "a module is a .js or .mjs file"));
        }
        let source = std::fs::read(name).map_err(|e| rquickjs::Error::new_loading_message(name, e.to_string()))?;
        Module::declare(ctx.clone(), name, source)
    }
}
