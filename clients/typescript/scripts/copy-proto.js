// Ships the wire contract with the package: the client loads it at run time,
// so there are no generated stubs to keep in sync by hand.
const fs = require("fs");
const path = require("path");
const from = path.join(__dirname, "..", "..", "..", "proto");
const to = path.join(__dirname, "..", "dist", "proto");
fs.rmSync(to, { recursive: true, force: true });
fs.cpSync(from, to, { recursive: true });
