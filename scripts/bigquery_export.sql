-- The CodeParrot corpus: every Python file of GitHub's public repositories with a license, 1 KB to 1 MB.
-- Run in BigQuery (about 2.6 TB scanned), save the result to a table, then export the table to Cloud Storage as
-- "JSON (newline delimited)" with GZIP compression: it arrives as file-000000000000.json.gz, ... which is the
-- format `codeparrot prepare` reads (set paths.raw to the downloaded folder).
SELECT
  f.repo_name,
  f.path,
  c.copies,
  c.size,
  c.content,
  l.license
FROM `bigquery-public-data.github_repos.files` AS f
JOIN `bigquery-public-data.github_repos.contents` AS c ON f.id = c.id
JOIN `bigquery-public-data.github_repos.licenses` AS l ON f.repo_name = l.repo_name
WHERE NOT c.binary
  AND f.path LIKE '%.py'
  AND c.size BETWEEN 1024 AND 1048575
