// Writes the ES module entry point (dist/esm): a thin wrapper that re-exports
// the CommonJS build by name, so `import` and `require` get the very same
// classes (an `instanceof` check holds whichever way the error's module was
// loaded) and the package state exists once.
const fs = require("fs");
const path = require("path");
const dist = path.join(__dirname, "..", "dist");
const names = Object.keys(require(path.join(dist, "src", "index.js"))).filter((name) => name !== "__esModule");
fs.mkdirSync(path.join(dist, "esm"), { recursive: true });
fs.writeFileSync(
  path.join(dist, "esm", "index.mjs"),
  `import idemd from "../src/index.js";\n\nexport const { ${names.join(", ")} } = idemd;\n`,
);
fs.writeFileSync(path.join(dist, "esm", "index.d.mts"), `export * from "../src/index.js";\n`);
