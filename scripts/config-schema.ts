/** Writes docs/config.schema.json from the configuration schema (`npm run config-schema`). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { configJsonSchema } from '../lib/daemon/config';

const file = path.resolve(__dirname, '..', '..', 'docs', 'config.schema.json');
fs.writeFileSync(file, `${JSON.stringify(configJsonSchema(), null, 2)}\n`);
process.stdout.write(`wrote ${file}\n`);
