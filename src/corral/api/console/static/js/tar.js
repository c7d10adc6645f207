// A ustar archive of browser File objects, as a Blob: the files' bytes are never read into
// script memory (the Blob refers to them), so a large upload streams from disk.
const BLOCK = 512;
const encoder = new TextEncoder();

function octal(value, width) {
  return value.toString(8).padStart(width - 1, "0") + "\0";
}

function put(header, offset, width, text) {
  const bytes = encoder.encode(text);
  if (bytes.length > width) throw new Error(`tar field too long: ${text}`);
  header.set(bytes, offset);
}

// Splits a path over ustar's name (100 bytes) and prefix (155) fields, at a slash.
function split(path) {
  if (encoder.encode(path).length <= 100) return ["", path];
  for (let i = path.length - 1; i > 0; i -= 1) {
    if (path[i] !== "/") continue;
    const prefix = path.slice(0, i);
    const name = path.slice(i + 1);
    if (encoder.encode(prefix).length <= 155 && encoder.encode(name).length <= 100) {
      return [prefix, name];
    }
  }
  throw new Error(`path too long for the archive: ${path}`);
}

function header(path, { size = 0, mode = 0o644, type = "0", mtime = Date.now() } = {}) {
  const block = new Uint8Array(BLOCK);
  const [prefix, name] = split(path);
  put(block, 0, 100, name);
  put(block, 100, 8, octal(mode, 8));
  put(block, 108, 8, octal(0, 8));
  put(block, 116, 8, octal(0, 8));
  put(block, 124, 12, octal(size, 12));
  put(block, 136, 12, octal(Math.floor(mtime / 1000), 12));
  block.fill(0x20, 148, 156); // the checksum counts its own field as spaces
  put(block, 156, 1, type);
  put(block, 257, 6, "ustar\0");
  put(block, 263, 2, "00");
  put(block, 345, 155, prefix);
  let sum = 0;
  for (const byte of block) sum += byte;
  put(block, 148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
  return block;
}

// entries: [{path, file}] with relative paths ("dir/sub/a.txt"); their directories come first.
export function tarBlob(entries) {
  const parts = [];
  const dirs = new Set();
  for (const { path } of entries) {
    const segments = path.split("/").slice(0, -1);
    for (let i = 1; i <= segments.length; i += 1) dirs.add(segments.slice(0, i).join("/"));
  }
  for (const dir of [...dirs].sort()) parts.push(header(`${dir}/`, { mode: 0o755, type: "5" }));
  for (const { path, file } of entries) {
    parts.push(header(path, { size: file.size, mtime: file.lastModified }));
    parts.push(file);
    const pad = (BLOCK - (file.size % BLOCK)) % BLOCK;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(BLOCK * 2));
  return new Blob(parts, { type: "application/x-tar" });
}
