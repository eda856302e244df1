// ESLint: typescript-eslint's strict type-checked rules, with the few that do not fit this code
// turned off below, each with its reason. Prettier owns the layout; ESLint only checks meaning.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/**', 'build/**', 'node_modules/**', '.cache/**', 'eslint.config.mjs'] },
  js.configs.recommended,
  ...tseslint.configs.strictTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      'max-len': ['error', { code: 120, ignoreUrls: true }],
      // Numbers and bigints in messages are the point of most log lines and errors here.
      '@typescript-eslint/restrict-template-expressions': [
        'error',
        { allowNumber: true, allowBoolean: true, allowNullish: true, allow: [{ from: 'lib', name: 'BigInt' }] },
      ],
      // Map lookups and array reads after an explicit bounds or presence check use `!` to say
      // so; the checks are the guarantee, and the rule cannot see them.
      '@typescript-eslint/no-non-null-assertion': 'off',
      // `() => void promise` and short callbacks returning void calls are the house style.
      '@typescript-eslint/no-confusing-void-expression': 'off',
      // Without noUncheckedIndexedAccess (not on: see tsconfig) this rule calls the bounds checks
      // on guest- and front-end-controlled indices "unnecessary"; they are the point.
      '@typescript-eslint/no-unnecessary-condition': 'off',
      // Wire values (a frame's request id) and typed arrays (page states) are numbers compared with
      // and cast to enum members on purpose: the enums name the values a wire or array holds.
      '@typescript-eslint/no-unsafe-enum-comparison': 'off',
      '@typescript-eslint/no-unsafe-enum-assignment': 'off',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],

    },
  },
);
