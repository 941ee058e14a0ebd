// Images attached to the next message: from the file picker, a paste, or a drag and drop; several per message.
// An image is sent as the file's own bytes (a data: URL) unless its longer side is over MAX_SIDE pixels: then it
// is downscaled in the browser to MAX_SIDE on the longer side and re-encoded as JPEG (quality 0.9). 1344 px is
// twice LLaVA-NeXT's 672 px tile: the server's anyres grid never uses more, so nothing the model sees is lost.
// Files that are not images are refused with a message. Leaves out: cropping, HEIC decoding (the browser's).

export const MAX_SIDE = 1344;
export const MAX_IMAGES = 8;  // the server's default --limit-mm-per-prompt

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function prepare(file) {
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    return readAsDataURL(file);  // the browser cannot decode it: let the server judge it
  }
  const { width, height } = bitmap;
  if (Math.max(width, height) <= MAX_SIDE) {
    bitmap.close();
    return readAsDataURL(file);
  }
  const scale = MAX_SIDE / Math.max(width, height);
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return canvas.toDataURL("image/jpeg", 0.9);
}

/** The composer's attachments: `add(files)`, `take()` (returns and clears the data URLs), thumbnails in `box`. */
export class Attachments {
  constructor(box, onMessage) {
    this.box = box;
    this.onMessage = onMessage;
    this.urls = [];
  }

  async add(files) {
    const images = [...files].filter((f) => f && f.type && f.type.startsWith("image/"));
    if (images.length < [...files].length) this.onMessage("only images can be attached");
    for (const file of images) {
      if (this.urls.length >= MAX_IMAGES) {
        this.onMessage(`at most ${MAX_IMAGES} images per message`);
        break;
      }
      try {
        this.urls.push(await prepare(file));
      } catch (err) {
        this.onMessage(`could not read ${file.name || "the image"}: ${err.message}`);
      }
    }
    this.draw();
  }

  take() {
    const urls = this.urls;
    this.urls = [];
    this.draw();
    return urls;
  }

  draw() {
    this.box.replaceChildren(...this.urls.map((url, i) => {
      const item = document.createElement("div");
      item.className = "thumb";
      const img = document.createElement("img");
      img.src = url;
      img.alt = `attached image ${i + 1}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "\u00d7";
      remove.setAttribute("aria-label", `remove image ${i + 1}`);
      remove.addEventListener("click", () => { this.urls.splice(i, 1); this.draw(); });
      item.append(img, remove);
      return item;
    }));
  }
}

/** Wire the file picker, paste (anywhere on the page) and drag and drop (anywhere on the page). */
export function wire(attachments, { button, input, overlay }) {
  button.addEventListener("click", () => input.click());
  input.addEventListener("change", () => { attachments.add(input.files); input.value = ""; });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      attachments.add(files);
    }
  });
  let depth = 0;
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) overlay.hidden = true; });
  document.addEventListener("dragover", (event) => { if (hasFiles(event)) event.preventDefault(); });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    if (event.dataTransfer?.files?.length) attachments.add(event.dataTransfer.files);
  });
}
